//! Which ready step runs next: one FIFO queue per (account, deployment, block), served
//! round-robin, each held to its block's `max_concurrency`, each account to its instance
//! quota, everything to a server-wide cap. Steps that must wait (a retry's interval, a
//! throttled invocation) sit in a timer heap until due. Pure bookkeeping, no I/O: the
//! engine's dispatcher drives it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

/// One step ready to run (or waiting until `due`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub run_id: String,
    pub step_id: String,
    pub key: QueueKey,
    /// The block's `max_concurrency`.
    pub max_concurrency: u32,
    /// When it became ready (transition latency is measured from here).
    pub queued_at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub account_id: String,
    pub deployment_id: i64,
    pub block: String,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    due: Instant,
    seq: u64,
    step_id: String,
    run_id: String,
    key: QueueKey,
    max_concurrency: u32,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    queues: HashMap<QueueKey, VecDeque<Ready>>,
    /// Keys with a non-empty queue, in serving order.
    order: VecDeque<QueueKey>,
    running: HashMap<QueueKey, u32>,
    running_per_account: HashMap<String, u32>,
    in_flight: usize,
    delayed: BinaryHeap<Reverse<Delayed>>,
    seq: u64,
}

impl Scheduler {
    /// Queues a ready step (behind the others of its block).
    pub fn push(&mut self, ready: Ready) {
        let queue = self.queues.entry(ready.key.clone()).or_default();
        if queue.is_empty() {
            self.order.push_back(ready.key.clone());
        }
        queue.push_back(ready);
    }

    /// Queues a step to become ready at `due`.
    pub fn push_at(&mut self, ready: Ready, due: Instant) {
        self.seq += 1;
        self.delayed.push(Reverse(Delayed {
            due,
            seq: self.seq,
            step_id: ready.step_id,
            run_id: ready.run_id,
            key: ready.key,
            max_concurrency: ready.max_concurrency,
        }));
    }

    /// Moves the steps due by `now` to their queues; returns when the next one is due.
    pub fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse(next)) = self.delayed.peek() {
            if next.due > now {
                return Some(next.due);
            }
            let Some(Reverse(d)) = self.delayed.pop() else {
                break;
            };
            self.push(Ready {
                run_id: d.run_id,
                step_id: d.step_id,
                key: d.key,
                max_concurrency: d.max_concurrency,
                queued_at: d.due,
            });
        }
        None
    }

    /// The next step to run, if any may run now: the first queue in turn whose block and
    /// account are under their limits (`account_limit` gives an account's). It counts as
    /// running until [`Scheduler::done`].
    pub fn next(
        &mut self,
        total_limit: usize,
        account_limit: &dyn Fn(&str) -> u32,
    ) -> Option<Ready> {
        if self.in_flight >= total_limit {
            return None;
        }
        for _ in 0..self.order.len() {
            let key = self.order.pop_front()?;
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            let Some(head) = queue.front() else {
                self.queues.remove(&key);
                continue;
            };
            let block_running = self.running.get(&key).copied().unwrap_or(0);
            let account_running = self
                .running_per_account
                .get(&key.account_id)
                .copied()
                .unwrap_or(0);
            if block_running >= head.max_concurrency.max(1)
                || account_running >= account_limit(&key.account_id).max(1)
            {
                self.order.push_back(key);
                continue;
            }
            let ready = queue.pop_front()?;
            if queue.is_empty() {
                self.queues.remove(&key);
            } else {
                self.order.push_back(key.clone());
            }
            *self.running.entry(key.clone()).or_default() += 1;
            *self.running_per_account.entry(key.account_id).or_default() += 1;
            self.in_flight += 1;
            return Some(ready);
        }
        None
    }

    /// A step returned by [`Scheduler::next`] stopped running.
    pub fn done(&mut self, key: &QueueKey) {
        if let Some(n) = self.running.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(key);
            }
        }
        if let Some(n) = self.running_per_account.get_mut(&key.account_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running_per_account.remove(&key.account_id);
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Steps waiting (ready or delayed).
    pub fn waiting(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum::<usize>() + self.delayed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(account: &str, block: &str, n: usize, max: u32) -> Ready {
        Ready {
            run_id: "run".into(),
            step_id: format!("{account}-{block}-{n}"),
            key: QueueKey {
                account_id: account.into(),
                deployment_id: 1,
                block: block.into(),
            },
            max_concurrency: max,
            queued_at: Instant::now(),
        }
    }

    #[test]
    fn a_big_queue_does_not_starve_another_account() {
        let mut s = Scheduler::default();
        for n in 0..1000 {
            s.push(ready("big", "b", n, 100));
        }
        s.push(ready("small", "b", 0, 100));
        let first: Vec<String> = (0..2)
            .filter_map(|_| s.next(10, &|_| 100))
            .map(|r| r.key.account_id)
            .collect();
        assert_eq!(first, ["big", "small"]);
    }

    #[test]
    fn limits_hold_steps_back_until_done() {
        let mut s = Scheduler::default();
        for n in 0..5 {
            s.push(ready("a", "b", n, 2));
        }
        let one = s.next(10, &|_| 100).expect("first");
        let _two = s.next(10, &|_| 100).expect("second");
        assert!(
            s.next(10, &|_| 100).is_none(),
            "max_concurrency 2 holds the third"
        );
        s.done(&one.key);
        assert!(s.next(10, &|_| 100).is_some());
        assert!(s.next(10, &|_| 100).is_none());
        // The account limit and the total cap hold too.
        let mut s = Scheduler::default();
        s.push(ready("a", "x", 0, 10));
        s.push(ready("a", "y", 0, 10));
        assert!(s.next(10, &|_| 1).is_some());
        assert!(s.next(10, &|_| 1).is_none());
        let mut s = Scheduler::default();
        s.push(ready("a", "x", 0, 10));
        assert!(s.next(0, &|_| 10).is_none());
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn delayed_steps_become_ready_when_due() {
        let mut s = Scheduler::default();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(5);
        s.push_at(ready("a", "b", 0, 1), later);
        assert_eq!(s.promote(now), Some(later));
        assert!(s.next(10, &|_| 10).is_none());
        assert_eq!(s.promote(later), None);
        assert!(s.next(10, &|_| 10).is_some());
    }
}
