//! Reserve + commit pairs per second with N concurrent clients, for `make bench`.
//!
//! `ledger_bench <database-url> [clients] [seconds] [shared]`: migrates the database, opens one
//! enterprise account per client (or one for all with `shared`), then runs for `seconds` and
//! prints pairs per second. scripts/bench.sh sets it beside pgbench on the same server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_ledger::{
    Action, Credits, Db, DbOptions, Ledger, NewAccount, PlanId, Pricing, SystemClock,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: ledger_bench <database-url> [clients] [seconds] [shared]")?;
    let clients: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(5), |s| s.parse())?;
    let shared = args.get(4).is_some_and(|s| s == "shared");

    let max_connections = u32::try_from(clients)? + 1;
    let db = Db::connect_with(
        url,
        &DbOptions {
            max_connections,
            ..DbOptions::default()
        },
    )
    .await?;
    db.migrate().await?;
    let ledger = Ledger::new(db, Arc::new(Pricing::default()), Arc::new(SystemClock));
    let new = NewAccount {
        plan: PlanId::Enterprise,
        is_admin: false,
        email: None,
        monthly_allowance: Some(Credits::new_const(1_000_000_000_000)),
    };
    let mut accounts = Vec::new();
    for _ in 0..(if shared { 1 } else { clients }) {
        accounts.push(ledger.create_account(new.clone()).await?.account.id);
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (ledger, account) = (ledger.clone(), accounts[c % accounts.len()]);
        tasks.push(tokio::spawn(async move {
            let mut pairs = 0u64;
            while Instant::now() < deadline {
                let r = ledger
                    .reserve(
                        account,
                        Action::EssentialsKit,
                        &format!("bench-{c}-{pairs}"),
                    )
                    .await?;
                ledger.commit(r.id).await?;
                pairs += 1;
            }
            Ok::<u64, kiln_ledger::LedgerError>(pairs)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let breaches = ledger.audit().await?;
    if !breaches.is_empty() {
        return Err(format!("invariants broken under load: {breaches:?}").into());
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = total as f64 / elapsed;
    println!("{rate:.1}");
    Ok(())
}
