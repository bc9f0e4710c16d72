//! `kiln`: order kits, run workers and drive the credit ledger from a shell, on the embedded
//! SQLite default or PostgreSQL.

mod kits;

/// mimalloc, not glibc's malloc: the cut-out model allocates and frees tens of megabytes per
/// layer, about 400 times a run, and glibc returns each block to the kernel and takes fresh
/// pages, zeroed by a page fault each, the next time. With mimalloc the model runs in about
/// 1.0 s on one core against 1.4 s (docs/BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln::app::{self, App, Migrate, WorkOptions};
use kiln::settings::Settings;
use kiln_core::{AccountId, Action, Credits, Kit, PlanId};
use kiln_jobs::JobId;
use kiln_ledger::{Balance, JournalPage, NewAccount};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "Credit-metered asset kits for jewelry designs"
)]
struct Cli {
    /// A TOML settings file (`kiln config` shows every setting; docs in README).
    #[arg(long, global = true, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade the database schema (the only command besides `demo` that does).
    Migrate,
    /// Print the effective settings (defaults, then the file, then KILN_* environment),
    /// secrets redacted.
    Config,
    /// Open and inspect accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Buy a top-up pack (idempotent by payment reference).
    Topup {
        account: AccountId,
        #[arg(long)]
        pack: String,
        #[arg(long = "payment-ref")]
        payment_ref: String,
    },
    /// What an action would cost an account now, and whether it can afford it.
    Quote {
        account: AccountId,
        #[arg(long)]
        action: Action,
    },
    /// Charge an action at once (reserve + commit), idempotent by key.
    Charge {
        account: AccountId,
        #[arg(long)]
        action: Action,
        #[arg(long = "idempotency-key")]
        idempotency_key: String,
    },
    /// Check the ledger's invariants (replaying every account's journal) and every kit against
    /// its charge, action, cost and account on the whole database; exits 1 on any breach.
    Audit {
        /// Also read every succeeded kit's manifest and files from storage and check they exist
        /// with the sizes and sha256 the manifest gives (reads every kit: slow on a big bucket).
        #[arg(long)]
        storage: bool,
    },
    /// Make kits end to end on the embedded default: a demo account, the bundled sample design
    /// (or yours), an in-process worker, a progress bar, where each asset landed, the balance.
    Demo {
        /// The design image (JPEG, PNG or WebP); default: the bundled sample ring.
        #[arg(long)]
        design: Option<PathBuf>,
        /// The product spec (JSON); default: the sample's.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// essentials, caratzon or both.
        #[arg(long, default_value = "both")]
        kit: String,
    },
    /// Serve the HTTP API (DESIGN.md §6) until SIGTERM or Ctrl-C; on the embedded default
    /// (SQLite) with kit workers in the same process unless --no-work.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Serve only; leave the kits to `kiln work` processes.
        #[arg(long = "no-work")]
        no_work: bool,
    },
    /// Run kit workers (and periodic maintenance) until SIGTERM or Ctrl-C.
    Work {
        /// Comma-separated: kits.essentials, kits.caratzon.
        #[arg(long, default_value = "kits.essentials,kits.caratzon")]
        queues: String,
        /// Kits run at once per queue.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Seconds running kits get to finish after SIGTERM.
        #[arg(long = "grace-secs", default_value_t = 60)]
        grace_secs: u64,
        /// Migrate the database first (single-machine setups); otherwise an unmigrated
        /// database is refused.
        #[arg(long)]
        migrate: bool,
        /// Serve this process's Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464;
        /// 127.0.0.1:0 picks a free port, printed at start). Off when not given.
        #[arg(long = "metrics-listen")]
        metrics_listen: Option<String>,
    },
    /// Order and follow kits.
    #[command(subcommand)]
    Kits(KitsCommand),
    /// Queue depth, oldest waiting job and live workers.
    Status,
    /// Your balance by kind through the HTTP API (`--api URL --key KEY`); on the database,
    /// `kiln accounts balance ID`.
    Balance {
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand, Debug)]
enum KitsCommand {
    /// Order a kit: checks the design and spec, reserves its credits and queues it; prints the job
    /// id. With `--api URL --key KEY` instead of `--account`, through the HTTP API.
    Create {
        #[arg(long, required_unless_present = "api")]
        account: Option<AccountId>,
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        design: PathBuf,
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        kit: Kit,
        /// Default: derived from the design, spec and kit, good for 24 hours (the same order
        /// again within a day is the same job, and is said to be).
        #[arg(long = "idempotency-key")]
        idempotency_key: Option<String>,
        /// Wait for the job to end, with a progress bar; exit 1 unless it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Show a job: its status (queued, running, succeeded, failed, cancelled), progress, charge.
    Status {
        id: JobId,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a queued job and release its credits.
    Cancel {
        id: JobId,
        #[arg(long)]
        account: AccountId,
    },
}

/// Through the HTTP API instead of the database: `--api URL --key KEY`.
#[derive(clap::Args, Debug, Clone)]
struct Remote {
    /// The kiln API's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, requires = "key")]
    api: Option<String>,
    /// Your API key (or KILN_API_KEY).
    #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Option<kiln::client::Client>> {
        match (&self.api, &self.key) {
            (Some(api), Some(key)) => Ok(Some(kiln::client::Client::new(api, key)?)),
            _ => Ok(None),
        }
    }
}

#[derive(Subcommand, Debug)]
enum AccountsCommand {
    /// Open an account; prints its id and API key (shown once).
    Create {
        #[arg(long)]
        plan: PlanId,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        email: Option<String>,
        /// Monthly credits, for enterprise accounts.
        #[arg(long, allow_negative_numbers = true)]
        allowance: Option<Credits>,
    },
    /// Show an account.
    Show { account: AccountId },
    /// Show an account's balance by kind.
    Balance { account: AccountId },
    /// Show an account's journal, oldest first.
    Ledger {
        account: AccountId,
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("RUST_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    let out = Out { json: cli.json };
    // The commands that change the schema or need storage and workers first; every other one
    // works on the ledger of an already migrated database.
    let command = match cli.command {
        Command::Migrate => {
            app::open_ledger(&settings, Migrate::Yes).await?;
            out.line(
                "migrated",
                &serde_json::json!({ "database": settings.database_display() }),
            );
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Config => {
            let v = settings.effective();
            out.print(&v);
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Demo { design, spec, kit } => {
            let kits = match kit.as_str() {
                "both" => vec![Kit::Essentials, Kit::Caratzon],
                other => vec![other.parse::<Kit>().map_err(|_| {
                    anyhow::anyhow!("--kit must be essentials, caratzon or both, not {other:?}")
                })?],
            };
            let app = App::build(settings, Migrate::Yes).await?;
            kits::demo(&app, design.as_deref(), spec.as_deref(), &kits).await?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Serve { listen, no_work } => {
            let app = App::build(settings, Migrate::No).await?;
            kits::serve(&app, &listen, !no_work).await?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Work {
            queues,
            concurrency,
            grace_secs,
            migrate,
            metrics_listen,
        } => {
            let queues = kits::parse_queues(&queues)?;
            anyhow::ensure!(!queues.is_empty(), "--queues names no queue");
            anyhow::ensure!(concurrency >= 1, "--concurrency must be at least 1");
            let migrate = if migrate { Migrate::Yes } else { Migrate::No };
            let app = App::build(settings, migrate).await?;
            let opts = WorkOptions {
                queues,
                concurrency,
                grace: std::time::Duration::from_secs(grace_secs),
            };
            let metrics = match metrics_listen {
                Some(listen) => {
                    let (addr, task) = app.serve_metrics(&listen).await?;
                    eprintln!("kiln work: metrics at http://{addr}/metrics");
                    Some(task)
                }
                None => None,
            };
            let worked = kits::work(&app, opts).await;
            if let Some(t) = metrics {
                t.abort();
            }
            worked?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Kits(KitsCommand::Create {
            account,
            remote,
            design,
            spec,
            kit,
            idempotency_key,
            wait,
        }) if remote.api.is_some() => {
            let client = remote.client()?.context("--api needs --key")?;
            let _ = account;
            let job = kits::create_remote(&client, &design, &spec, kit, idempotency_key).await?;
            let job = if wait {
                let id = job["id"].as_str().unwrap_or_default().to_owned();
                kits::follow(
                    kit.as_str(),
                    || client.job(&id, Some(25)),
                    kiln::client::progress_of,
                )
                .await?
            } else {
                job
            };
            if out.json || wait {
                out.print(&job);
            } else {
                println!("{}", job["id"].as_str().unwrap_or_default());
            }
            let (status, _) = kiln::client::progress_of(&job);
            if wait && status != kiln_jobs::JobStatus::Succeeded {
                return Ok(std::process::ExitCode::FAILURE);
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Kits(KitsCommand::Status { id, remote }) if remote.api.is_some() => {
            let client = remote.client()?.context("--api needs --key")?;
            out.print(&client.job(id.as_str(), None).await?);
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Balance { remote } => {
            let client = remote
                .client()?
                .context("kiln balance goes through the API: pass --api URL --key KEY (on the database: kiln accounts balance ID)")?;
            out.print(&client.balance().await?);
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Kits(KitsCommand::Create {
            account,
            design,
            spec,
            kit,
            idempotency_key,
            wait,
            ..
        }) => {
            let account = account.context("--account (or --api URL --key KEY) is needed")?;
            let app = App::build(settings, Migrate::No).await?;
            let job = kits::create(
                &app,
                kits::NewKit {
                    account,
                    design: &design,
                    spec: &spec,
                    kit,
                    key: idempotency_key,
                },
            )
            .await?;
            let job = if wait {
                kits::wait(app.ledger(), &job.id, kit.as_str()).await?
            } else {
                job
            };
            if out.json {
                out.print(&job.view());
            } else if wait {
                kits::print_job(&job);
            } else {
                println!("{}", job.id);
            }
            if wait && job.status != kiln_jobs::JobStatus::Succeeded {
                return Ok(std::process::ExitCode::FAILURE);
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
        other => other,
    };
    let ledger = app::open_ledger(&settings, Migrate::No).await?;
    match command {
        Command::Accounts(AccountsCommand::Create {
            plan,
            admin,
            email,
            allowance,
        }) => {
            let new = NewAccount {
                plan,
                is_admin: admin,
                email,
                monthly_allowance: allowance,
            };
            let created = ledger.create_account(new).await?;
            if out.json {
                out.print(&created);
            } else {
                println!("account  {}", created.account.id);
                println!("api_key  {}", created.api_key);
                println!(
                    "plan     {}{}",
                    created.account.plan,
                    if admin { " (admin)" } else { "" }
                );
                eprintln!("The API key is shown only once: store it now.");
            }
        }
        Command::Accounts(AccountsCommand::Show { account }) => {
            let a = ledger.account(account).await?;
            if out.json {
                out.print(&a);
            } else {
                println!("account  {}", a.id);
                println!(
                    "plan     {}{}",
                    a.plan,
                    a.monthly_allowance
                        .map(|m| format!(" ({m}/month)"))
                        .unwrap_or_default()
                );
                println!("admin    {}", a.is_admin);
                println!("email    {}", a.email.as_deref().unwrap_or("-"));
                println!("created  {}", a.created_at);
            }
        }
        Command::Accounts(AccountsCommand::Balance { account }) => {
            let b = ledger.balance(account).await?;
            if out.json {
                out.print(&b)
            } else {
                print_balance(&b)
            }
        }
        Command::Accounts(AccountsCommand::Ledger {
            account,
            after,
            limit,
        }) => {
            let page = ledger.journal(account, after, limit).await?;
            if out.json {
                out.print(&page)
            } else {
                print_journal(&page)
            }
        }
        Command::Topup {
            account,
            pack,
            payment_ref,
        } => {
            let g = ledger.topup(account, &pack, &payment_ref).await?;
            if out.json {
                out.print(&g);
            } else {
                println!(
                    "granted  {} top-up credits (grant {}, payment ref {payment_ref})",
                    g.amount, g.id
                );
                print_balance(&ledger.balance(account).await?);
            }
        }
        Command::Quote { account, action } => {
            let q = ledger.quote(account, action).await?;
            if out.json {
                out.print(&q);
            } else {
                println!(
                    "{action}: {} credits (list price {}), {} available",
                    q.cost, q.list_price, q.available
                );
                if q.affordable {
                    println!("affordable");
                } else {
                    println!(
                        "short by {}: top up with `kiln topup {account} --pack ...`",
                        q.shortfall
                    );
                }
            }
        }
        Command::Charge {
            account,
            action,
            idempotency_key,
        } => {
            let r = ledger.charge(account, action, &idempotency_key).await?;
            if out.json {
                out.print(&r);
            } else {
                let exempt = if r.exempt {
                    format!(" (exempt; list price {})", r.list_price)
                } else {
                    String::new()
                };
                println!(
                    "charged  {} credits for {action}{exempt}, reservation {}",
                    r.amount, r.id
                );
                print_balance(&ledger.balance(account).await?);
            }
        }
        Command::Kits(KitsCommand::Status { id, .. }) => {
            let job = kits::job(&ledger, &id).await?;
            if out.json {
                out.print(&job.view());
            } else {
                kits::print_job(&job);
            }
        }
        Command::Kits(KitsCommand::Cancel { id, account }) => {
            let mut tx = ledger.db().begin().await?;
            let job = kiln_jobs::cancel(&mut tx, &ledger.ctx(), account, &id).await?;
            tx.commit().await?;
            if out.json {
                out.print(&job.view());
            } else {
                kits::print_job(&job);
            }
        }
        Command::Migrate
        | Command::Config
        | Command::Demo { .. }
        | Command::Balance { .. }
        | Command::Serve { .. }
        | Command::Work { .. }
        | Command::Kits(KitsCommand::Create { .. }) => unreachable!("handled above"),
        Command::Status => {
            let s = kits::status(&ledger).await?;
            if out.json {
                out.print(&s);
            } else {
                for q in s["queues"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} queued {:>4}  running {:>4}  oldest queued {}",
                        q["queue"].as_str().unwrap_or_default(),
                        q["queued"],
                        q["running"],
                        q["oldest_queued_ms"]
                            .as_i64()
                            .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
                    );
                }
                let workers = s["workers"].as_array().cloned().unwrap_or_default();
                println!("workers {}", workers.len());
                for w in workers {
                    println!(
                        "  {}  {}  seen {}s ago",
                        w["name"].as_str().unwrap_or_default(),
                        w["queue"].as_str().unwrap_or_default(),
                        w["last_seen_secs_ago"]
                    );
                }
            }
        }
        Command::Audit { storage } => {
            let mut tx = ledger.db().begin_read().await?;
            let mut breaches = kiln_jobs::audit(&mut tx, None).await?;
            drop(tx);
            if storage {
                let objects = app::open_storage(&settings).await?;
                breaches.extend(kiln::audit::audit_storage(ledger.db(), &objects).await?);
            }
            if out.json {
                out.print(
                    &serde_json::json!({ "clean": breaches.is_empty(), "breaches": breaches }),
                );
            } else if breaches.is_empty() {
                println!(
                    "ledger clean: every invariant holds, every job agrees with its charge{}",
                    if storage {
                        "; every succeeded kit's files are in storage as its manifest says"
                    } else {
                        ""
                    }
                );
            } else {
                for b in &breaches {
                    println!("BREACH account {}: {}", b.account_id, b.what);
                }
            }
            if !breaches.is_empty() {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

struct Out {
    json: bool,
}

impl Out {
    fn print<T: Serialize>(&self, v: &T) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot render JSON: {e}"),
        }
    }

    fn line(&self, text: &str, json: &serde_json::Value) {
        if self.json {
            self.print(json)
        } else {
            println!("{text}")
        }
    }
}

fn print_balance(b: &Balance) {
    println!("available  {}", b.available);
    println!("held       {}", b.held);
    println!("committed  {}", b.committed);
    println!("expired    {}", b.expired);
    for k in &b.by_kind {
        let expiry = k
            .expires_at
            .map_or("never expires".to_owned(), |e| format!("expires {e}"));
        println!(
            "  {:<13} {:>8}  {expiry}",
            k.kind.as_str(),
            k.remaining.get()
        );
    }
}

fn print_journal(page: &JournalPage) {
    println!(
        "{:>5}  {:<24}  {:<8} {:>8}  {:>9} {:>7}  detail",
        "seq", "at", "entry", "amount", "available", "held"
    );
    for e in &page.entries {
        let detail = [
            e.kind.map(|k| k.to_string()),
            e.action.map(|a| a.to_string()),
            e.list_price
                .filter(|p| *p != e.amount)
                .map(|p| format!("list price {p}")),
            e.reference.clone(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        println!(
            "{:>5}  {:<24}  {:<8} {:>8}  {:>9} {:>7}  {detail}",
            e.seq,
            e.at.to_string(),
            e.entry.as_str(),
            e.amount.get(),
            e.available_after.get(),
            e.held_after.get()
        );
    }
    if let Some(n) = page.next_after {
        println!("more: --after {n}");
    }
}
