//! Behaviour of the store against a real SQLite file in a temporary directory.

use std::collections::BTreeMap;

use refinery_domain::{BlockSpec, ExecutionRecord, ExecutionStatus, Language, UserError};
use refinery_store::{ExecutionUsage, Store, StoreError};

/// Metering inputs for executions these tests record (billing has its own tests).
const USAGE: ExecutionUsage = ExecutionUsage {
    memory_mb: 128,
    ended_at_ms: 1_000,
    egress_bytes: 0,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn block(name: &str) -> BlockSpec {
    let mut env = BTreeMap::new();
    env.insert("GREETING".to_string(), "hi \"there\"".to_string());
    BlockSpec {
        files: Default::default(),
        binary_files: Default::default(),
        shared: Vec::new(),
        function: "main".into(),
        secret_env: Default::default(),
        name: name.to_string(),
        language: Language::Python,
        source_name: format!("{name}.py"),
        code: "def main(event, context):\n    return event\n".to_string(),
        memory_mb: 256,
        timeout_s: 30,
        max_concurrency: 10,
        keep_alive_s: Some(120),
        min_warm: 2,
        tmp_mb: 64,
        env,
        // Block "b" asks for network, so the round trips below cover both values.
        network: name == "b",
        deps_layer: None,
    }
}

fn execution(account_id: &str, id: &str, block: &str, started_at_ms: i64) -> ExecutionRecord {
    ExecutionRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        project: "shop".to_string(),
        deployment: 1,
        block: block.to_string(),
        instance_id: "inst_1".to_string(),
        cold: true,
        started_at_ms,
        duration_ms: 12.5,
        init_ms: Some(3.25),
        status: ExecutionStatus::Error,
        input: "{\"a\":1}".to_string(),
        input_truncated: false,
        output: None,
        output_truncated: false,
        error: Some(UserError {
            kind: "ValueError".to_string(),
            message: "bad".to_string(),
            traceback: Some("Traceback ...".to_string()),
        }),
        logs: "line 1\nline 2\n".to_string(),
        logs_truncated: true,
    }
}

#[tokio::test]
async fn accounts_create_duplicate_and_lookup() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("nested/data")).await?;

    let alice = store.create_account("alice", "hash-a", "rk_a").await?;
    assert!(alice.id.starts_with("acct_"));
    assert_eq!(alice.id.len(), "acct_".len() + 16);
    assert!(alice.id[5..]
        .chars()
        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));

    match store.create_account("alice", "hash-other", "rk_o").await {
        Err(StoreError::AccountExists(name)) => assert_eq!(name, "alice"),
        other => panic!("expected AccountExists, got {other:?}"),
    }
    match store.create_account("bob", "hash-a", "rk_a").await {
        Err(StoreError::KeyExists) => {}
        other => panic!("expected KeyExists, got {other:?}"),
    }
    // The failed creation of bob left nothing behind.
    let bob = store.create_account("bob", "hash-b", "rk_b").await?;

    assert_eq!(
        store.account_by_key_hash("hash-a").await?,
        Some(alice.clone())
    );
    assert_eq!(
        store.account_by_key_hash("hash-b").await?,
        Some(bob.clone())
    );
    assert_eq!(store.account_by_key_hash("nope").await?, None);

    store.add_api_key(&alice.id, "hash-a2", "rk_a2").await?;
    assert_eq!(
        store.account_by_key_hash("hash-a2").await?,
        Some(alice.clone())
    );
    assert!(matches!(
        store.add_api_key("acct_missing", "hash-x", "rk_x").await,
        Err(StoreError::AccountNotFound(_))
    ));

    let names: Vec<_> = store
        .list_accounts()
        .await?
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(store.account(&bob.id).await?, Some(bob));
    Ok(())
}

#[tokio::test]
async fn deployments_number_and_switch_live() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;

    assert_eq!(store.live_deployment(&acct.id, "shop").await?, None);
    assert!(store.list_projects(&acct.id).await?.is_empty());

    let d1 = store
        .create_deployment(&acct.id, "shop", "# v1", &[block("a")])
        .await?;
    let d2 = store
        .create_deployment(&acct.id, "shop", "# v2", &[block("a"), block("b")])
        .await?;
    let d3 = store
        .create_deployment(&acct.id, "shop", "# v3", &[block("c")])
        .await?;
    assert_eq!((d1.number, d2.number, d3.number), (1, 2, 3));
    assert!(d1.id != d2.id && d2.id != d3.id);
    assert!(d3.live);

    let live = store
        .live_deployment(&acct.id, "shop")
        .await?
        .ok_or("no live")?;
    assert_eq!(live, d3);

    let got2 = store
        .deployment(&acct.id, "shop", 2)
        .await?
        .ok_or("no d2")?;
    assert_eq!(got2.manifest, "# v2");
    assert_eq!(got2.blocks, vec![block("a"), block("b")]);
    assert!(!got2.live);
    assert_eq!(store.deployment(&acct.id, "shop", 9).await?, None);

    let list = store.list_deployments(&acct.id, "shop").await?;
    let summary: Vec<_> = list
        .iter()
        .map(|d| (d.number, d.live, d.blocks.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, false, vec!["a".to_string()]),
            (2, false, vec!["a".to_string(), "b".to_string()]),
            (3, true, vec!["c".to_string()]),
        ]
    );

    // Roll back to 1.
    let rolled = store.set_live(&acct.id, "shop", 1).await?;
    assert_eq!(rolled.number, 1);
    assert!(rolled.live);
    assert_eq!(rolled.blocks, vec![block("a")]);
    let live = store
        .live_deployment(&acct.id, "shop")
        .await?
        .ok_or("no live")?;
    assert_eq!(live.number, 1);
    let lives: Vec<_> = store
        .list_deployments(&acct.id, "shop")
        .await?
        .into_iter()
        .filter(|d| d.live)
        .map(|d| d.number)
        .collect();
    assert_eq!(lives, [1]);

    // A new deploy after a rollback still takes max + 1 and goes live.
    let d4 = store
        .create_deployment(&acct.id, "shop", "# v4", &[])
        .await?;
    assert_eq!(d4.number, 4);
    assert_eq!(
        store
            .live_deployment(&acct.id, "shop")
            .await?
            .map(|d| d.number),
        Some(4)
    );

    match store.set_live(&acct.id, "shop", 7).await {
        Err(StoreError::DeploymentNotFound { project, number }) => {
            assert_eq!((project.as_str(), number), ("shop", 7));
        }
        other => panic!("expected DeploymentNotFound, got {other:?}"),
    }
    assert!(matches!(
        store.set_live(&acct.id, "nope", 1).await,
        Err(StoreError::ProjectNotFound(p)) if p == "nope"
    ));
    assert!(matches!(
        store.list_deployments(&acct.id, "nope").await,
        Err(StoreError::ProjectNotFound(_))
    ));

    store
        .create_deployment(&acct.id, "blog", "", &[block("x")])
        .await?;
    let projects: Vec<_> = store
        .list_projects(&acct.id)
        .await?
        .into_iter()
        .map(|p| (p.name, p.live_deployment))
        .collect();
    assert_eq!(
        projects,
        [("blog".to_string(), Some(1)), ("shop".to_string(), Some(4))]
    );

    assert!(matches!(
        store
            .create_deployment("acct_missing", "shop", "", &[])
            .await,
        Err(StoreError::AccountNotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn accounts_cannot_see_each_others_rows() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let a = store.create_account("a", "ha", "pa").await?;
    let b = store.create_account("b", "hb", "pb").await?;

    store
        .create_deployment(&a.id, "x", "# a1", &[block("a")])
        .await?;
    store
        .create_deployment(&a.id, "x", "# a2", &[block("a")])
        .await?;

    // B sees nothing of A's project.
    assert_eq!(store.live_deployment(&b.id, "x").await?, None);
    assert_eq!(store.deployment(&b.id, "x", 1).await?, None);
    assert!(store.list_projects(&b.id).await?.is_empty());
    assert!(matches!(
        store.list_deployments(&b.id, "x").await,
        Err(StoreError::ProjectNotFound(_))
    ));
    assert!(matches!(
        store.set_live(&b.id, "x", 1).await,
        Err(StoreError::ProjectNotFound(_))
    ));
    // A's live deployment is untouched by B's attempt.
    assert_eq!(
        store.live_deployment(&a.id, "x").await?.map(|d| d.number),
        Some(2)
    );

    // B may own its own "x", numbered independently.
    let bx = store
        .create_deployment(&b.id, "x", "# b1", &[block("b")])
        .await?;
    assert_eq!(bx.number, 1);
    assert_eq!(
        store.live_deployment(&b.id, "x").await?.map(|d| d.manifest),
        Some("# b1".into())
    );
    assert_eq!(
        store.live_deployment(&a.id, "x").await?.map(|d| d.manifest),
        Some("# a2".into())
    );
    assert_eq!(store.list_deployments(&a.id, "x").await?.len(), 2);
    assert_eq!(store.list_deployments(&b.id, "x").await?.len(), 1);

    // Executions.
    store
        .insert_execution(&execution(&a.id, "exec_a", "a", 1000), &USAGE)
        .await?;
    assert_eq!(store.execution(&b.id, "exec_a").await?, None);
    assert!(store
        .list_executions(&b.id, "shop", None, 10)
        .await?
        .is_empty());
    assert!(store.execution(&a.id, "exec_a").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn executions_insert_list_filter_limit_get() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;

    for (i, blk) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        let i = i64::try_from(i)?;
        let mut rec = execution(&acct.id, &format!("exec_{i}"), blk, 1000 + i);
        if i == 4 {
            rec.status = ExecutionStatus::Ok;
            rec.output = Some("42".to_string());
            rec.error = None;
            rec.init_ms = None;
            rec.cold = false;
        }
        store.insert_execution(&rec, &USAGE).await?;
    }

    let all = store.list_executions(&acct.id, "shop", None, 100).await?;
    let ids: Vec<_> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["exec_4", "exec_3", "exec_2", "exec_1", "exec_0"]);

    let only_a = store
        .list_executions(&acct.id, "shop", Some("a"), 100)
        .await?;
    let ids: Vec<_> = only_a.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["exec_4", "exec_2", "exec_0"]);

    let two = store.list_executions(&acct.id, "shop", None, 2).await?;
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].id, "exec_4");

    assert!(store
        .list_executions(&acct.id, "other", None, 10)
        .await?
        .is_empty());

    // Full round trip of every field.
    let got = store
        .execution(&acct.id, "exec_1")
        .await?
        .ok_or("missing")?;
    assert_eq!(got, execution(&acct.id, "exec_1", "b", 1001));
    let ok = store
        .execution(&acct.id, "exec_4")
        .await?
        .ok_or("missing")?;
    assert_eq!(ok.status, ExecutionStatus::Ok);
    assert_eq!(ok.output.as_deref(), Some("42"));
    assert_eq!(ok.error, None);
    assert_eq!(ok.init_ms, None);
    assert!(!ok.cold);
    assert_eq!(store.execution(&acct.id, "nope").await?, None);

    // Duplicate ids and unknown accounts are refused.
    assert!(store
        .insert_execution(&execution(&acct.id, "exec_1", "b", 5), &USAGE)
        .await
        .is_err());
    assert!(matches!(
        store
            .insert_execution(&execution("acct_missing", "e9", "b", 5), &USAGE)
            .await,
        Err(StoreError::AccountNotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn data_survives_close_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (acct, d2) = {
        let store = Store::open(dir.path()).await?;
        let acct = store.create_account("alice", "h", "p").await?;
        store
            .create_deployment(&acct.id, "shop", "# v1", &[block("a")])
            .await?;
        let d2 = store
            .create_deployment(&acct.id, "shop", "# v2", &[block("a"), block("b")])
            .await?;
        store.set_live(&acct.id, "shop", 1).await?;
        store
            .insert_execution(&execution(&acct.id, "exec_1", "a", 1), &USAGE)
            .await?;
        store.close().await;
        (acct, d2)
    };
    // Opening twice in a row (second open without close) is fine too.
    let _other = Store::open(dir.path()).await?;
    let store = Store::open(dir.path()).await?;
    assert!(store.path().ends_with("refinery.db"));
    assert_eq!(store.account_by_key_hash("h").await?, Some(acct.clone()));
    assert_eq!(
        store
            .live_deployment(&acct.id, "shop")
            .await?
            .map(|d| d.number),
        Some(1)
    );
    let mut got2 = store
        .deployment(&acct.id, "shop", 2)
        .await?
        .ok_or("no d2")?;
    assert!(!got2.live);
    got2.live = true;
    assert_eq!(got2, d2);
    assert!(store.execution(&acct.id, "exec_1").await?.is_some());
    assert_eq!(
        store
            .create_deployment(&acct.id, "shop", "# v3", &[])
            .await?
            .number,
        3
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deploys_get_distinct_numbers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;

    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        let account_id = acct.id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create_deployment(&account_id, "shop", &format!("# {i}"), &[block("a")])
                .await
        }));
    }
    let mut numbers = Vec::new();
    for task in tasks {
        numbers.push(task.await??.number);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=10).collect::<Vec<i64>>());

    let list = store.list_deployments(&acct.id, "shop").await?;
    assert_eq!(list.len(), 10);
    assert_eq!(list.iter().filter(|d| d.live).count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deploys_from_two_handles_get_distinct_numbers() -> TestResult {
    // Two independently opened stores on one file, as two processes would have.
    let dir = tempfile::tempdir()?;
    let first = Store::open(dir.path()).await?;
    let second = Store::open(dir.path()).await?;
    let acct = first.create_account("alice", "h", "p").await?;

    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = if i % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let account_id = acct.id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create_deployment(&account_id, "shop", "", &[block("a")])
                .await
        }));
    }
    let mut numbers = Vec::new();
    for task in tasks {
        numbers.push(task.await??.number);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=10).collect::<Vec<i64>>());
    Ok(())
}

#[tokio::test]
async fn quotas_set_read_reset_and_lookup_by_name() -> TestResult {
    use refinery_store::QuotaOverrides;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acme = store.create_account("acme", "hash-q", "rk_q").await?;
    assert_eq!(store.account_by_name("acme").await?, Some(acme.clone()));
    assert_eq!(store.account_by_name("nobody").await?, None);

    assert!(store.quota(&acme.id).await?.is_empty());
    let set = QuotaOverrides {
        instances: Some(2),
        memory_mb: None,
        rate: Some(0.5),
        burst: Some(3),
        storage_mb: Some(7),
    };
    store.set_quota(&acme.id, &set).await?;
    assert_eq!(store.quota(&acme.id).await?, set);
    let changed = QuotaOverrides {
        memory_mb: Some(4096),
        ..set
    };
    store.set_quota(&acme.id, &changed).await?;
    assert_eq!(store.quota(&acme.id).await?, changed);
    assert_eq!(store.list_quotas().await?, vec![(acme.id.clone(), changed)]);

    store
        .set_quota(&acme.id, &QuotaOverrides::default())
        .await?;
    assert!(store.quota(&acme.id).await?.is_empty());
    assert!(store.list_quotas().await?.is_empty());

    for overrides in [set, QuotaOverrides::default()] {
        match store.set_quota("acct_missing", &overrides).await {
            Err(StoreError::AccountNotFound(id)) => assert_eq!(id, "acct_missing"),
            other => panic!("expected AccountNotFound, got {other:?}"),
        }
    }
    // Persisted across a reopen.
    store.set_quota(&acme.id, &set).await?;
    store.close().await;
    let store = Store::open(dir.path()).await?;
    assert_eq!(store.quota(&acme.id).await?, set);
    Ok(())
}

#[tokio::test]
async fn retention_quota_and_deletion_never_reuse_a_deployment_id() -> TestResult {
    use refinery_store::Retention;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("acme", "hash-r", "rf_r").await?;
    let keep_two = Retention {
        keep: 2,
        storage_limit_bytes: u64::MAX,
    };
    let mut ids = Vec::new();
    for n in 1..=3 {
        let d = store
            .deploy(
                &acct.id,
                "shop",
                &format!("# v{n}"),
                &[block("a")],
                keep_two,
            )
            .await?;
        ids.push(d.deployment.id);
        // The third deploy prunes the first; the others prune nothing.
        let expected: Vec<i64> = if n == 3 { vec![ids[0]] } else { vec![] };
        assert_eq!(d.pruned, expected);
    }
    let numbers: Vec<i64> = store
        .list_deployments(&acct.id, "shop")
        .await?
        .iter()
        .map(|d| d.number)
        .collect();
    assert_eq!(numbers, vec![2, 3]);
    assert!(matches!(
        store.set_live(&acct.id, "shop", 1).await,
        Err(StoreError::DeploymentPruned { number: 1, .. })
    ));
    let one = refinery_store::storage::Footprint::of("# v3", &[block("a")]).stored_bytes;
    assert_eq!(store.storage_used(&acct.id).await?, 2 * one);

    // Over the quota: refused, nothing stored.
    let tight = Retention {
        keep: 10,
        storage_limit_bytes: 2 * one,
    };
    let refused = store
        .deploy(&acct.id, "other", "# v1", &[block("a")], tight)
        .await;
    assert!(
        matches!(refused, Err(StoreError::StorageQuota { .. })),
        "{refused:?}"
    );
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains(&format!("the account holds {} bytes", 2 * one))
            && !message.contains("  "),
        "one sentence, singly spaced: {message}"
    );
    assert!(store.list_deployments(&acct.id, "other").await.is_err());

    // Deleting the project (which holds the highest id) frees its storage; the next
    // deployment still gets a new id, never one handed out before.
    let removed = store.delete_project(&acct.id, "shop").await?;
    assert_eq!(removed, vec![ids[1], ids[2]]);
    assert_eq!(store.storage_used(&acct.id).await?, 0);
    assert!(matches!(
        store.delete_project(&acct.id, "shop").await,
        Err(StoreError::ProjectNotFound(_))
    ));
    let again = store
        .deploy(&acct.id, "shop", "# v1", &[block("a")], keep_two)
        .await?;
    assert_eq!(again.deployment.number, 1);
    assert!(
        again.deployment.id > ids[2],
        "id {} reused",
        again.deployment.id
    );
    // A number of the deleted project is not "pruned" for the new one.
    assert!(matches!(
        store.set_live(&acct.id, "shop", 3).await,
        Err(StoreError::DeploymentNotFound { .. })
    ));
    Ok(())
}

/// Creates run `run_id` and, in the same transaction, claims `slot_ms` of timer `tick`;
/// commits only if the claim succeeded. Returns whether it did.
async fn fire(
    store: &Store,
    account_id: &str,
    run_id: &str,
    slot_ms: i64,
) -> Result<bool, Box<dyn std::error::Error>> {
    let account_id = account_id.to_string();
    let claimed = store
        .run_tx(run_id, move |tx| {
            tx.create_run(&account_id, "clock", 1, 1, "tick", slot_ms + 3)?;
            let claimed = tx.claim_timer_slot(&refinery_store::TimerClaim {
                account_id: account_id.clone(),
                project: "clock".into(),
                timer: "tick".into(),
                slot_ms,
                fired_at_ms: slot_ms + 3,
            })?;
            // Not claimed: roll the run back, as the engine does.
            if claimed {
                Ok(true)
            } else {
                Err(refinery_store::StoreError::Corrupt("slot fired".into()))
            }
        })
        .await
        .or_else(|e| match e {
            refinery_store::StoreError::Corrupt(_) => Ok::<bool, refinery_store::StoreError>(false),
            other => Err(other),
        })?;
    Ok(claimed)
}

#[tokio::test]
async fn a_timer_slot_is_claimed_once_and_only_upwards() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path()).await?;
    let acct = store.create_account("alice", "h", "p").await?;
    // First seen: the latest slot at or before now counts as fired.
    let state = store
        .know_timer(&acct.id, "clock", "tick", "rate(2 seconds)", 10_000)
        .await?;
    assert_eq!(state.last_slot_ms, 10_000);
    assert!(
        !fire(&store, &acct.id, "run_a", 10_000).await?,
        "counted as fired"
    );
    assert!(fire(&store, &acct.id, "run_b", 12_000).await?);
    assert!(
        !fire(&store, &acct.id, "run_c", 12_000).await?,
        "a slot fires once"
    );
    assert!(
        !fire(&store, &acct.id, "run_d", 8_000).await?,
        "never an earlier slot"
    );
    assert!(
        store.run_record("run_c").await?.is_none(),
        "no run without its claim"
    );
    let fires = store.timer_fires(&acct.id, "clock", "tick", 10).await?;
    assert_eq!(fires.len(), 1);
    assert_eq!(
        (fires[0].slot_ms, fires[0].run_id.as_str()),
        (12_000, "run_b")
    );
    assert_eq!(fires[0].fired_at_ms, 12_003);
    // Known again with the same schedule (a redeploy): the state stays.
    let state = store
        .know_timer(&acct.id, "clock", "tick", "rate(2 seconds)", 14_000)
        .await?;
    assert_eq!(state.last_slot_ms, 12_000);
    // Another schedule starts afresh, never lower.
    let state = store
        .know_timer(&acct.id, "clock", "tick", "rate(1 second)", 15_000)
        .await?;
    assert_eq!(state.last_slot_ms, 15_000);
    // Only the most recent fires are kept.
    for i in 0..(refinery_store::MAX_TIMER_FIRES_KEPT + 5) {
        assert!(fire(&store, &acct.id, &format!("run_{i}"), 16_000 + i * 1000).await?);
    }
    let fires = store.timer_fires(&acct.id, "clock", "tick", 1000).await?;
    assert_eq!(fires.len() as i64, refinery_store::MAX_TIMER_FIRES_KEPT);
    // Forgotten (removed from the live deployment): known afresh later.
    store.forget_timer(&acct.id, "clock", "tick").await?;
    assert!(store.timer_slot(&acct.id, "clock", "tick").await?.is_none());
    Ok(())
}
