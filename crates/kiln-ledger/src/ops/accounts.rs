//! Accounts: opening one (with its welcome grant and API key), reading it, quotes and balances.

use super::prelude::*;

pub(crate) fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Only enterprise accounts set their own allowance (and must, unless the price list gives one).
fn check_plan(ctx: &Ctx<'_>, plan: PlanId, allowance: Option<Credits>) -> Result<()> {
    match (plan, allowance) {
        (PlanId::Enterprise, None)
            if ctx
                .pricing
                .plan(PlanId::Enterprise)
                .monthly_credits
                .is_none() =>
        {
            return Err(LedgerError::AllowanceRequired(PlanId::Enterprise));
        }
        (PlanId::Enterprise, Some(a)) if a.is_zero() => {
            return Err(Credits::positive(0).unwrap_err().into());
        }
        (PlanId::Enterprise, _) | (_, None) => {}
        (plan, Some(_)) => return Err(LedgerError::AllowanceNotAllowed(plan)),
    }
    Ok(())
}

/// Moves the account to `plan` (an operator action). The new plan's allowance applies from the
/// current cycle if it has not been granted yet (e.g. from Discover), else from the next
/// renewal; credits already granted keep their expiry dates.
pub async fn set_plan(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    plan: PlanId,
    allowance: Option<Credits>,
) -> Result<Account> {
    check_plan(ctx, plan, allowance)?;
    let mut acct = lock(tx, id).await?;
    on_tx!(tx, c => sqlx::query("UPDATE accounts SET plan = $2, monthly_allowance = $3 WHERE id = $1")
        .bind(id.to_string())
        .bind(plan.as_str())
        .bind(allowance.map(Credits::as_i64))
        .execute(&mut **c)
        .await?
        .rows_affected());
    acct.account.plan = plan;
    acct.account.monthly_allowance = allowance;
    bring_up_to_date(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    Ok(acct.account)
}

pub async fn create_account(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    new: &NewAccount,
) -> Result<CreatedAccount> {
    check_plan(ctx, new.plan, new.monthly_allowance)?;
    if let Some(email) = &new.email {
        check_key(email, "email")?;
    }
    let id = AccountId::new();
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret)
        .map_err(|e| LedgerError::Io(format!("no randomness for an API key: {e}")))?;
    let api_key = format!("kiln_{}", hex::encode(secret));
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO accounts (id, email, plan, is_admin, monthly_allowance, api_key_hash, cycle_anchor_ms, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(id.to_string())
    .bind(new.email.as_deref())
    .bind(new.plan.as_str())
    .bind(new.is_admin)
    .bind(new.monthly_allowance.map(Credits::as_i64))
    .bind(hash_api_key(&api_key))
    .bind(ctx.now.millis())
    .execute(&mut **c)
    .await?
        .rows_affected());
    let mut acct = lock(tx, id).await?;
    let welcome = ctx.pricing.plan(new.plan).welcome_credits;
    if !welcome.is_zero() {
        let source = format!("welcome:{id}");
        let spec = GrantSpec {
            kind: CreditKind::Welcome,
            amount: welcome,
            expires_at: None,
            source: &source,
            fingerprint: &source,
        };
        insert_grant(tx, &mut acct, ctx.now, &spec).await?;
    }
    bring_up_to_date(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    Ok(CreatedAccount {
        account: acct.account,
        api_key,
    })
}

pub(crate) async fn read_account(tx: &mut Tx, id: AccountId) -> Result<Locked> {
    let row: Option<AccountRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM accounts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **c)
        .await?);
    Locked::from_row(row.ok_or(LedgerError::AccountNotFound(id))?)
}

pub async fn account(tx: &mut Tx, id: AccountId) -> Result<Account> {
    Ok(read_account(tx, id).await?.account)
}

/// The account an API key belongs to: one indexed read, outside any transaction (every
/// authenticated request makes it).
pub async fn account_by_api_key(db: &Db, key: &str) -> Result<Option<Account>> {
    let row: Option<AccountRow> = on_pool!(db, p => sqlx::query_as("SELECT * FROM accounts WHERE api_key_hash = $1")
        .bind(hash_api_key(key))
        .fetch_optional(p)
        .await?);
    row.map(|r| Ok(Locked::from_row(r)?.account)).transpose()
}

pub async fn quote(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId, action: Action) -> Result<Quote> {
    let mut acct = lock(tx, id).await?;
    let live = bring_up_to_date(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    let list_price = ctx.pricing.cost(action);
    let cost = if acct.account.is_admin {
        Credits::ZERO
    } else {
        list_price
    };
    let available = plan::available(&live, ctx.now);
    Ok(Quote {
        action,
        cost,
        list_price,
        available,
        affordable: cost <= available,
        shortfall: cost.saturating_sub(available),
    })
}

pub async fn balance(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId) -> Result<Balance> {
    let mut acct = lock(tx, id).await?;
    let mut live = bring_up_to_date(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    plan::sort_burn_down(&mut live);
    let mut by_kind: Vec<KindBalance> = Vec::new();
    for g in live {
        match by_kind.last_mut() {
            Some(k) if k.kind == g.kind && k.expires_at == g.expires_at => {
                k.remaining = k.remaining.checked_add(g.remaining)?;
            }
            _ => by_kind.push(KindBalance {
                kind: g.kind,
                remaining: g.remaining,
                expires_at: g.expires_at,
            }),
        }
    }
    let t = &acct.totals;
    Ok(Balance {
        available: t.available(),
        held: t.held,
        committed: t.committed,
        expired: t.expired,
        granted: t.granted,
        by_kind,
    })
}

/// The account's running totals as stored, without bringing the account up to date first (no
/// expiry booking, no renewal): a pure read, for audits and operators.
pub async fn totals(tx: &mut Tx, id: AccountId) -> Result<Totals> {
    Ok(read_account(tx, id).await?.totals)
}
