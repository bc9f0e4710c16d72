//! `kiln`: drive the credit ledger from a shell, on the embedded SQLite default or PostgreSQL.

mod config;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_core::{AccountId, Credits, PlanId};
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
    /// Check the ledger's invariants on the whole database; exits 1 on any breach.
    Audit,
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
