//! `kiln`: drive the credit ledger from a shell, on the embedded SQLite default or PostgreSQL.

mod config;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_core::{AccountId, Action, Credits, PlanId};
use kiln_ledger::{Balance, Db, JournalPage, Ledger, NewAccount, SystemClock};
use serde::Serialize;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "Credit-metered asset kits for jewelry designs"
)]
struct Cli {
    /// A TOML config file (database_url, [pricing]).
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
    /// Create or upgrade the database schema.
    Migrate,
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
    /// Check the ledger's invariants on the whole database; exits 1 on any breach.
    Audit,
    /// Walk through the billing path on the embedded default: a new account, Cara charges, a
    /// kit's reservation released as a failed job would, a top-up, and the journal.
    Demo,
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

async fn connect(config: &Config) -> anyhow::Result<Ledger> {
    let db = Db::connect(&config.database_url)
        .await
        .with_context(|| format!("cannot open the database at {}", config.database_url))?;
    db.migrate().await.context("cannot migrate the database")?;
    Ok(Ledger::new(
        db,
        Arc::new(config.pricing.clone()),
        Arc::new(SystemClock),
    ))
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let ledger = connect(&config).await?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Migrate => out.line(
            "migrated",
            &serde_json::json!({ "database": redact(&config.database_url) }),
        ),
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
        Command::Demo => demo(&ledger).await?,
        Command::Audit => {
            let breaches = ledger.audit().await?;
            if out.json {
                out.print(
                    &serde_json::json!({ "clean": breaches.is_empty(), "breaches": breaches }),
                );
            } else if breaches.is_empty() {
                println!("ledger clean: every invariant holds");
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

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
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

async fn demo(ledger: &Ledger) -> anyhow::Result<()> {
    let new = NewAccount {
        plan: PlanId::Discover,
        is_admin: false,
        email: Some("demo@kiln.local".into()),
        monthly_allowance: None,
    };
    let id = ledger.create_account(new).await?.account.id;
    println!("== a Discover account {id} opens with its welcome credits");
    print_balance(&ledger.balance(id).await?);
    let before = ledger.balance(id).await?.available;

    println!(
        "\n== two Cara messages, charged on send (the second send is a retry: same key, one charge)"
    );
    for key in ["msg-1", "msg-2", "msg-2"] {
        let r = ledger.charge(id, Action::TextMessage, key).await?;
        println!("charge {key}: {} credits, reservation {}", r.amount, r.id);
    }

    println!("\n== a Caratzon kit is quoted, its credits held, and released as a failed job would");
    let q = ledger.quote(id, Action::CaratzonKit).await?;
    println!(
        "quote: {} credits, {} available, affordable: {}",
        q.cost, q.available, q.affordable
    );
    let r = ledger.reserve(id, Action::CaratzonKit, "kit-1").await?;
    println!("held {} credits (reservation {})", r.amount, r.id);
    print_balance(&ledger.balance(id).await?);
    ledger.release(r.id).await?;
    println!("released: the credits went back");

    println!("\n== a top-up pack, bought twice with one payment reference: granted once");
    for _ in 0..2 {
        ledger.topup(id, "small", "demo-payment-1").await?;
    }
    let after = ledger.balance(id).await?;
    print_balance(&after);
    println!("\nbalance before {before}, after {} ", after.available);

    println!("\n== the journal");
    print_journal(&ledger.journal(id, None, 50).await?);
    let breaches = ledger.audit_account(id).await?;
    anyhow::ensure!(
        breaches.is_empty(),
        "ledger invariants broken: {breaches:?}"
    );
    println!("\naudit: every invariant holds. Kits themselves join this demo with the kit worker.");
    Ok(())
}
