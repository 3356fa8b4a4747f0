//! Durable queues: their messages, claims (in flight), and dead letters.
//!
//! Messages are keyed by (account, project, queue name), so they outlive redeploys. The
//! engine (`refinery_engine`) decides what to claim and when; this module only stores:
//! - [`Store::enqueue_messages`] (the API) and [`RunTx::enqueue_messages`] (a step's `then`
//!   into a queue, in that step's commit) add messages, bounded per account;
//! - [`Store::claim_messages`] takes up to a batch of visible messages for a run (receive
//!   count + 1, invisible until the visibility timeout), dead-lettering first any visible
//!   message already received `max_receive_count` times;
//! - [`RunTx::settle_messages`], in the commit of the consumer's step, deletes what the run
//!   processed and makes the rest visible again (or dead-letters it) — only messages the
//!   run still holds: a claim that expired and was taken by another run is not touched.

use sqlx::Row;

use crate::runs::RunTx;
use crate::{now_ms, Store, StoreError};

/// The most dead letters one listing returns.
pub const MAX_DEAD_LETTER_LIST: u32 = 1000;

/// A queue, named.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueRef {
    pub account_id: String,
    pub project: String,
    pub queue: String,
}

/// One message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueMessage {
    /// `msg_` + 32 hex characters.
    pub id: String,
    /// JSON text.
    pub body: String,
    pub enqueued_at_ms: i64,
    pub receive_count: i64,
    /// When it was dead-lettered.
    pub dead_at_ms: Option<i64>,
}

/// The result of an enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// This many messages were stored.
    Stored(usize),
    /// Nothing was stored: the account holds `stored` messages, and `stored + adding`
    /// would exceed `limit`.
    Full { stored: u64, limit: u64 },
}

/// What [`Store::claim_messages`] took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    /// The batch, oldest first (each with its receive count after this receipt).
    pub messages: Vec<QueueMessage>,
    /// Messages moved to the dead-letter list instead (received too often).
    pub dead_lettered: u64,
    /// When the next message not in this batch becomes visible (`None`: none left; now,
    /// after a full batch).
    pub next_visible_at_ms: Option<i64>,
}

/// A queue's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    pub visible: u64,
    pub in_flight: u64,
    pub dead_letter: u64,
    /// Enqueue time of the oldest message not dead-lettered.
    pub oldest_enqueued_at_ms: Option<i64>,
}

/// How the consumer's batch ended, to settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: deleted, except these message ids (reported failed: `batchItemFailures`).
    Succeeded { failed: Vec<String> },
    /// The consumer failed (no retry left): every message of the batch failed.
    Failed,
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub deleted: u64,
    /// Made visible again.
    pub released: u64,
    pub dead_lettered: u64,
}

fn new_message_id() -> String {
    format!("msg_{}", uuid::Uuid::now_v7().simple())
}

fn message_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<QueueMessage, sqlx::Error> {
    Ok(QueueMessage {
        id: row.try_get("id")?,
        body: row.try_get("body")?,
        enqueued_at_ms: row.try_get("enqueued_at_ms")?,
        receive_count: row.try_get("receive_count")?,
        dead_at_ms: row.try_get("dead_at_ms")?,
    })
}

/// Inserts `bodies` into `queue` within `tx` unless the account would hold more than
/// `limit` messages.
async fn enqueue_in(
    tx: &mut sqlx::SqliteConnection,
    queue: &QueueRef,
    bodies: &[String],
    limit: u64,
    what: &str,
) -> Result<Enqueued, StoreError> {
    let (stored,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM queue_messages WHERE account_id = ?")
            .bind(&queue.account_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db(what))?;
    let stored = u64::try_from(stored).unwrap_or(0);
    if stored + bodies.len() as u64 > limit {
        return Ok(Enqueued::Full { stored, limit });
    }
    let now = now_ms();
    for body in bodies {
        sqlx::query(
            "INSERT INTO queue_messages (id, account_id, project, queue, body, enqueued_at_ms, \
             visible_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(new_message_id())
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .bind(body)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(what))?;
    }
    Ok(Enqueued::Stored(bodies.len()))
}

impl Store {
    /// Adds messages (JSON texts) to `queue`, all or none: none if the account would then
    /// hold more than `limit` messages (visible, in flight and dead-lettered).
    pub async fn enqueue_messages(
        &self,
        queue: &QueueRef,
        bodies: &[String],
        limit: u64,
    ) -> Result<Enqueued, StoreError> {
        let what = format!("enqueueing into queue `{}`", queue.queue);
        let mut tx = self.begin_write(what.clone()).await?;
        let done = enqueue_in(&mut tx, queue, bodies, limit, &what).await?;
        if matches!(done, Enqueued::Stored(_)) {
            tx.commit().await.map_err(StoreError::db(what))?;
        }
        Ok(done)
    }

    /// Claims up to `batch` visible messages of `queue` for run `run_id`: each is received
    /// once more and invisible for `visibility_ms`. A visible message already received
    /// `max_receive_count` times is dead-lettered instead.
    pub async fn claim_messages(
        &self,
        queue: &QueueRef,
        run_id: &str,
        batch: u32,
        visibility_ms: i64,
        max_receive_count: i64,
    ) -> Result<Claimed, StoreError> {
        let what = || format!("receiving from queue `{}`", queue.queue);
        let now = now_ms();
        let mut tx = self.begin_write(what()).await?;
        let mut dead = 0;
        let mut messages: Vec<QueueMessage> = Vec::new();
        // The oldest visible messages (the index's order): each is delivered, or
        // dead-lettered if it was received too often; until the batch is full.
        while messages.len() < batch as usize {
            let candidates: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT seq, receive_count FROM queue_messages \
                 WHERE account_id = ? AND project = ? AND queue = ? AND dead_at_ms IS NULL \
                 AND visible_at_ms <= ? ORDER BY visible_at_ms, seq LIMIT ?",
            )
            .bind(&queue.account_id)
            .bind(&queue.project)
            .bind(&queue.queue)
            .bind(now)
            .bind(i64::from(batch) - messages.len() as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(what()))?;
            if candidates.is_empty() {
                break;
            }
            let (dying, live): (Vec<_>, Vec<_>) = candidates
                .into_iter()
                .partition(|(_, receive_count)| *receive_count >= max_receive_count);
            if !dying.is_empty() {
                let seqs: Vec<i64> = dying.iter().map(|(seq, _)| *seq).collect();
                let sql = format!(
                    "UPDATE queue_messages SET dead_at_ms = ?, claim = NULL WHERE seq IN ({})",
                    placeholders(seqs.len())
                );
                let mut query = sqlx::query(&sql).bind(now);
                for seq in &seqs {
                    query = query.bind(seq);
                }
                query
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(what()))?;
                dead += seqs.len() as u64;
            }
            if live.is_empty() {
                continue;
            }
            let sql = format!(
                "UPDATE queue_messages SET receive_count = receive_count + 1, visible_at_ms = ?, \
                 claim = ? WHERE seq IN ({}) \
                 RETURNING seq, id, body, enqueued_at_ms, receive_count, dead_at_ms",
                placeholders(live.len())
            );
            let mut query = sqlx::query(&sql).bind(now + visibility_ms).bind(run_id);
            for (seq, _) in &live {
                query = query.bind(seq);
            }
            let rows = query
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::db(what()))?;
            let mut claimed: Vec<(i64, QueueMessage)> = rows
                .iter()
                .map(|r| Ok((r.try_get("seq")?, message_from_row(r)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::db(what()))?;
            claimed.sort_by_key(|(seq, _)| *seq);
            messages.extend(claimed.into_iter().map(|(_, m)| m));
        }
        if messages.len() == batch as usize {
            // A full batch: the pump asks again at once, no need to know what is next.
            tx.commit().await.map_err(StoreError::db(what()))?;
            return Ok(Claimed {
                messages,
                dead_lettered: dead,
                next_visible_at_ms: Some(now),
            });
        }
        let (next,): (Option<i64>,) = sqlx::query_as(
            "SELECT MIN(visible_at_ms) FROM queue_messages \
             WHERE account_id = ? AND project = ? AND queue = ? AND dead_at_ms IS NULL \
             AND (claim IS NULL OR claim <> ?)",
        )
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db(what()))?;
        tx.commit().await.map_err(StoreError::db(what()))?;
        Ok(Claimed {
            messages,
            dead_lettered: dead,
            next_visible_at_ms: next,
        })
    }

    /// Gives back the messages run `run_id` claimed but never ran (its run could not
    /// start): visible now, their receipt not counted.
    pub async fn unclaim_messages(&self, run_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE queue_messages SET claim = NULL, visible_at_ms = ?, \
             receive_count = MAX(receive_count - 1, 0) WHERE claim = ? AND dead_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(run_id)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "giving back the messages of run {run_id}"
        )))?;
        Ok(())
    }

    /// The counts of `queue` now.
    pub async fn queue_stats(&self, queue: &QueueRef) -> Result<QueueStats, StoreError> {
        let row = sqlx::query(
            "SELECT \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NULL AND visible_at_ms <= ?1 THEN 1 ELSE 0 END), 0) AS visible, \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NULL AND visible_at_ms > ?1 THEN 1 ELSE 0 END), 0) AS in_flight, \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS dead, \
             MIN(CASE WHEN dead_at_ms IS NULL THEN enqueued_at_ms END) AS oldest \
             FROM queue_messages WHERE account_id = ?2 AND project = ?3 AND queue = ?4",
        )
        .bind(now_ms())
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::db(format!("counting queue `{}`", queue.queue)))?;
        stats_from_row(&row).map_err(StoreError::db(format!("counting queue `{}`", queue.queue)))
    }

    /// Every queue holding messages (all accounts), with its counts: for the metrics and
    /// for the engine's start.
    pub async fn all_queue_stats(&self) -> Result<Vec<(QueueRef, QueueStats)>, StoreError> {
        let what = || "counting the queues".to_string();
        let rows = sqlx::query(
            "SELECT account_id, project, queue, \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NULL AND visible_at_ms <= ?1 THEN 1 ELSE 0 END), 0) AS visible, \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NULL AND visible_at_ms > ?1 THEN 1 ELSE 0 END), 0) AS in_flight, \
             COALESCE(SUM(CASE WHEN dead_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS dead, \
             MIN(CASE WHEN dead_at_ms IS NULL THEN enqueued_at_ms END) AS oldest \
             FROM queue_messages GROUP BY account_id, project, queue \
             ORDER BY account_id, project, queue",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        rows.iter()
            .map(|r| {
                Ok((
                    QueueRef {
                        account_id: r.try_get("account_id")?,
                        project: r.try_get("project")?,
                        queue: r.try_get("queue")?,
                    },
                    stats_from_row(r)?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::db(what()))
    }

    /// The dead letters of `queue`, oldest first, at most `limit` (capped at
    /// [`MAX_DEAD_LETTER_LIST`]).
    pub async fn dead_letters(
        &self,
        queue: &QueueRef,
        limit: u32,
    ) -> Result<Vec<QueueMessage>, StoreError> {
        let what = || format!("listing the dead letters of queue `{}`", queue.queue);
        let rows = sqlx::query(
            "SELECT id, body, enqueued_at_ms, receive_count, dead_at_ms FROM queue_messages \
             WHERE account_id = ? AND project = ? AND queue = ? AND dead_at_ms IS NOT NULL \
             ORDER BY seq LIMIT ?",
        )
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .bind(i64::from(limit.min(MAX_DEAD_LETTER_LIST)))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::db(what()))?;
        rows.iter()
            .map(message_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::db(what()))
    }

    /// Moves every dead letter of `queue` back into it (visible now, receive count 0);
    /// returns how many.
    pub async fn redrive_dead_letters(&self, queue: &QueueRef) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE queue_messages SET dead_at_ms = NULL, claim = NULL, receive_count = 0, \
             visible_at_ms = ? WHERE account_id = ? AND project = ? AND queue = ? \
             AND dead_at_ms IS NOT NULL",
        )
        .bind(now_ms())
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "redriving the dead letters of queue `{}`",
            queue.queue
        )))?;
        Ok(done.rows_affected())
    }

    /// Deletes every dead letter of `queue`; returns how many.
    pub async fn purge_dead_letters(&self, queue: &QueueRef) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM queue_messages WHERE account_id = ? AND project = ? AND queue = ? \
             AND dead_at_ms IS NOT NULL",
        )
        .bind(&queue.account_id)
        .bind(&queue.project)
        .bind(&queue.queue)
        .execute(&self.pool)
        .await
        .map_err(StoreError::db(format!(
            "purging the dead letters of queue `{}`",
            queue.queue
        )))?;
        Ok(done.rows_affected())
    }
}

fn stats_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<QueueStats, sqlx::Error> {
    let count = |name: &str| -> Result<u64, sqlx::Error> {
        Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
    };
    Ok(QueueStats {
        visible: count("visible")?,
        in_flight: count("in_flight")?,
        dead_letter: count("dead")?,
        oldest_enqueued_at_ms: row.try_get("oldest")?,
    })
}

impl RunTx<'_> {
    /// [`Store::enqueue_messages`] within this run's transaction (a step's `then` into a
    /// queue: the messages are stored if and only if the step's result is).
    pub fn enqueue_messages(
        &mut self,
        queue: &QueueRef,
        bodies: &[String],
        limit: u64,
    ) -> Result<Enqueued, StoreError> {
        let what = self.what();
        let conn = self.conn();
        let stored: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM queue_messages WHERE account_id = ?1")
            .and_then(|mut s| s.query_row([&queue.account_id], |row| row.get(0)))
            .map_err(StoreError::write(what.clone()))?;
        let stored = u64::try_from(stored).unwrap_or(0);
        if stored + bodies.len() as u64 > limit {
            return Ok(Enqueued::Full { stored, limit });
        }
        let now = now_ms();
        for body in bodies {
            self.exec(
                "INSERT INTO queue_messages (id, account_id, project, queue, body, enqueued_at_ms, \
                 visible_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                rusqlite::params![
                    new_message_id(),
                    queue.account_id,
                    queue.project,
                    queue.queue,
                    body,
                    now
                ],
            )?;
        }
        Ok(Enqueued::Stored(bodies.len()))
    }

    /// The ids of the messages this run holds (claimed, not dead-lettered).
    pub fn held_message_ids(&mut self) -> Result<Vec<String>, StoreError> {
        let what = self.what();
        let run_id = self.run_id().to_string();
        let conn = self.conn();
        let mut statement = conn
            .prepare_cached("SELECT id FROM queue_messages WHERE claim = ?1 AND dead_at_ms IS NULL")
            .map_err(StoreError::write(what.clone()))?;
        let ids = statement
            .query_map([&run_id], |row| row.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(StoreError::write(what))?;
        Ok(ids)
    }

    /// Settles the batch this run holds, with its consumer step's result: processed
    /// messages are deleted; failed ones become visible now, or are dead-lettered if they
    /// were received `max_receive_count` times. Messages no longer claimed by this run
    /// (their visibility timeout passed and another run took them) are left alone.
    pub fn settle_messages(
        &mut self,
        settlement: &Settlement,
        max_receive_count: i64,
    ) -> Result<Settled, StoreError> {
        let run_id = self.run_id().to_string();
        let now = now_ms();
        let mut settled = Settled::default();
        let failed: Option<&[String]> = match settlement {
            Settlement::Failed => None,
            Settlement::Succeeded { failed } => Some(failed),
        };
        // Processed: deleted (everything the run holds but the failed ones).
        if let Some(failed) = failed {
            let sql = if failed.is_empty() {
                "DELETE FROM queue_messages WHERE claim = ? AND dead_at_ms IS NULL".to_string()
            } else {
                format!(
                    "DELETE FROM queue_messages WHERE claim = ? AND dead_at_ms IS NULL \
                     AND id NOT IN ({})",
                    placeholders(failed.len())
                )
            };
            let mut values: Vec<&str> = vec![run_id.as_str()];
            values.extend(failed.iter().map(String::as_str));
            settled.deleted = self.exec(&sql, rusqlite::params_from_iter(values))? as u64;
            if failed.is_empty() {
                return Ok(settled);
            }
        }
        // Failed (what is still held): dead-lettered at max_receive_count, else visible.
        for (dead, set) in [(true, "dead_at_ms = ?1"), (false, "visible_at_ms = ?1")] {
            let test = if dead { ">=" } else { "<" };
            let sql = format!(
                "UPDATE queue_messages SET claim = NULL, {set} \
                 WHERE claim = ?2 AND dead_at_ms IS NULL AND receive_count {test} ?3"
            );
            let n = self.exec(&sql, rusqlite::params![now, run_id, max_receive_count])? as u64;
            if dead {
                settled.dead_lettered = n;
            } else {
                settled.released = n;
            }
        }
        Ok(settled)
    }
}

/// `?, ?, ?` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}
