//! Run transactions (`Store::run_tx`, on the run writer's thread) against a real SQLite
//! file: committed on `Ok`, rolled back on `Err` or a panic, in order, and visible to the
//! pool's readers once answered.

use refinery_store::{NewStep, Store, StoreError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn step(id: &str) -> NewStep {
    NewStep {
        id: id.into(),
        name: "a".into(),
        transition: "start".into(),
        transition_id: None,
        parents: Vec::new(),
        item: None,
        frame: String::new(),
        depth: 1,
        attempt: 1,
        input: "1".into(),
        backpack: "{}".into(),
        not_before_ms: 0,
    }
}

async fn create(store: &Store, account_id: &str, run_id: &str, steps: Vec<NewStep>) -> TestResult {
    let account_id = account_id.to_string();
    store
        .run_tx(run_id, move |tx| {
            tx.create_run(&account_id, "svc", 1, 1, "a", 1_000)?;
            for s in &steps {
                tx.insert_step(s)?;
            }
            tx.add_live("", steps.len() as i64)?;
            Ok::<_, StoreError>(())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_run_transaction_commits_on_ok_and_rolls_back_on_err() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;

    create(&store, &acct.id, "run_1", vec![step("st_1"), step("st_2")]).await?;
    let (run, steps) = store
        .run_with_steps(&acct.id, "run_1")
        .await?
        .ok_or("run_1 was not committed")?;
    assert_eq!((run.status.as_str(), run.steps), ("running", 2));
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.id.as_str(), s.seq))
            .collect::<Vec<_>>(),
        [("st_1", 0), ("st_2", 1)]
    );

    // A closure that fails after writing leaves nothing of it behind.
    let failed: Result<(), StoreError> = store
        .run_tx("run_1", |tx| {
            tx.insert_step(&step("st_3"))?;
            tx.end_run("succeeded")?;
            Err(StoreError::Corrupt(
                "the test fails this transaction".into(),
            ))
        })
        .await;
    assert!(matches!(failed, Err(StoreError::Corrupt(_))), "{failed:?}");
    let (run, steps) = store
        .run_with_steps(&acct.id, "run_1")
        .await?
        .ok_or("run_1 vanished")?;
    assert_eq!(
        (run.status.as_str(), run.steps, steps.len()),
        ("running", 2, 2)
    );

    // The next one continues the step numbering where the committed ones left it.
    let seq = store
        .run_tx("run_1", |tx| tx.insert_step(&step("st_4")))
        .await?;
    assert_eq!(seq, 2);
    assert_eq!(store.run_record("run_1").await?.map(|r| r.steps), Some(3));

    // A run of an account that does not exist is refused by its foreign key, nothing kept.
    let refused = create(&store, "acct_missing", "run_2", vec![step("st_5")]).await;
    assert!(refused.is_err());
    assert_eq!(store.run_record("run_2").await?, None);
    Ok(())
}

#[tokio::test]
async fn a_panicking_run_transaction_fails_only_its_caller() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;
    create(&store, &acct.id, "run_1", vec![step("st_1")]).await?;

    let panicked: Result<(), StoreError> = store
        .run_tx("run_1", |tx| {
            tx.end_run("succeeded")?;
            panic!("a bug in a run transaction (this test's)");
        })
        .await;
    let err = panicked
        .err()
        .ok_or("a panicking transaction answered Ok")?;
    assert!(
        matches!(err, StoreError::Interrupted(_)),
        "{err:?} should say the transaction was given up"
    );
    assert!(err.to_string().contains("was not written"), "{err}");
    // Rolled back, and the thread goes on.
    assert_eq!(
        store.run_record("run_1").await?.map(|r| r.status),
        Some("running".into())
    );
    store.mark_step_running("st_1").await?;
    let step = store.step("st_1").await?.ok_or("st_1 vanished")?;
    assert_eq!(step.status, "running");
    assert!(step.started_at_ms.is_some());
    Ok(())
}

#[tokio::test]
async fn run_transactions_run_in_the_order_they_were_sent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;
    create(&store, &acct.id, "run_1", Vec::new()).await?;

    // Concurrent transactions of one run each add a step: every one gets its own `seq`.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .run_tx("run_1", move |tx| tx.insert_step(&step(&format!("st_{i}"))))
                .await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await??);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..50).collect::<Vec<i64>>());
    assert_eq!(store.run_record("run_1").await?.map(|r| r.steps), Some(50));

    // Closed: a transaction is refused, saying why.
    store.close().await;
    let closed = store
        .run_tx("run_1", |tx| tx.insert_step(&step("st_late")))
        .await;
    assert!(matches!(closed, Err(StoreError::Closed(_))), "{closed:?}");
    Ok(())
}

#[tokio::test]
async fn a_failing_transaction_waiting_with_others_loses_none_of_theirs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;
    create(&store, &acct.id, "run_1", Vec::new()).await?;

    // A slow transaction first, so that the next ones wait together (they then share a
    // transaction, each in a savepoint): every third fails after writing, one panics.
    let slow = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .run_tx("run_1", |tx| {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    tx.add_live("slow", 1)
                })
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .run_tx("run_1", move |tx| {
                    tx.insert_step(&step(&format!("st_{i}")))?;
                    tx.add_live(&format!("f{i}"), 1)?;
                    if i == 7 {
                        panic!("a bug in a run transaction (this test's)");
                    }
                    if i % 3 == 0 {
                        return Err(StoreError::Corrupt(format!("test failure {i}")));
                    }
                    Ok(i)
                })
                .await
        }));
    }
    assert_eq!(slow.await??, 1);
    let mut kept = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Ok(n) => kept.push(n),
            Err(StoreError::Corrupt(_)) => assert_eq!(i % 3, 0, "{i} failed"),
            Err(StoreError::Interrupted(_)) => assert_eq!(i, 7),
            Err(e) => return Err(format!("transaction {i}: {e}").into()),
        }
    }
    let expected: Vec<i32> = (0..30).filter(|i| i % 3 != 0 && *i != 7).collect();
    assert_eq!(kept, expected);
    let (run, steps) = store
        .run_with_steps(&acct.id, "run_1")
        .await?
        .ok_or("run_1 vanished")?;
    let ids: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
    let want: Vec<String> = expected.iter().map(|i| format!("st_{i}")).collect();
    assert_eq!(
        ids, want,
        "exactly the steps of the transactions that succeeded"
    );
    // Their numbers are consecutive: a rolled-back one gave its number back.
    let seqs: Vec<i64> = steps.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (0..expected.len() as i64).collect::<Vec<_>>());
    assert_eq!(run.steps, expected.len() as i64);
    Ok(())
}
