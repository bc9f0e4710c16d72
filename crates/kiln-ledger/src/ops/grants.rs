//! Grants: inserting them (welcome, subscription, top-up), bringing an account up to date on
//! access (booking due expiries, granting the current cycle's allowance), renewals and top-ups.

use super::prelude::*;

pub(crate) async fn open_grants(tx: &mut Tx, id: AccountId) -> Result<Vec<OpenGrant>> {
    let rows: Vec<GrantRow> = on_tx!(tx, c => sqlx::query_as(
        "SELECT * FROM grants WHERE account_id = $1 AND remaining > 0",
    )
    .bind(id.to_string())
    .fetch_all(&mut **c)
    .await?);
    rows.into_iter()
        .map(|r| {
            let g = r.into_grant()?;
            Ok(OpenGrant {
                id: g.id,
                kind: g.kind,
                remaining: g.remaining,
                granted_at: g.granted_at,
                expires_at: g.expires_at,
            })
        })
        .collect()
}

pub(crate) async fn grant_by_source(tx: &mut Tx, source: &str) -> Result<Option<(Grant, String)>> {
    let row: Option<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE source = $1")
        .bind(source)
        .fetch_optional(&mut **c)
        .await?);
    row.map(|r| {
        let fp = r.fingerprint.clone();
        Ok((r.into_grant()?, fp))
    })
    .transpose()
}

pub(crate) struct GrantSpec<'a> {
    pub(crate) kind: CreditKind,
    pub(crate) amount: Credits,
    pub(crate) expires_at: Option<Timestamp>,
    pub(crate) source: &'a str,
    pub(crate) fingerprint: &'a str,
}

/// Inserts a grant unless one with the same source exists. Returns the new grant, or `None`
/// when the source was already used (the caller decides whether that is a replay or a conflict).
pub(crate) async fn insert_grant(
    tx: &mut Tx,
    acct: &mut Locked,
    now: Timestamp,
    spec: &GrantSpec<'_>,
) -> Result<Option<Grant>> {
    let id: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "INSERT INTO grants (account_id, kind, amount, remaining, granted_at_ms, expires_at_ms, source, fingerprint) \
         VALUES ($1, $2, $3, $3, $4, $5, $6, $7) ON CONFLICT (source) DO NOTHING RETURNING id",
    )
    .bind(acct.account.id.to_string())
    .bind(spec.kind.as_str())
    .bind(spec.amount.as_i64())
    .bind(now.millis())
    .bind(spec.expires_at.map(Timestamp::millis))
    .bind(spec.source)
    .bind(spec.fingerprint)
    .fetch_optional(&mut **c)
    .await?);
    let Some(id) = id else { return Ok(None) };
    let grant = Grant {
        id: GrantId(id),
        account_id: acct.account.id,
        kind: spec.kind,
        amount: spec.amount,
        remaining: spec.amount,
        expired: Credits::ZERO,
        granted_at: now,
        expires_at: spec.expires_at,
        source: spec.source.to_owned(),
    };
    acct.granted(&grant)?;
    Ok(Some(grant))
}

pub(crate) async fn exec_grant_update(
    tx: &mut Tx,
    sql: &'static str,
    grant: GrantId,
    amount: Credits,
) -> Result<()> {
    let done = on_tx!(tx, c => sqlx::query(sql).bind(grant.0).bind(amount.as_i64()).execute(&mut **c).await?
        .rows_affected());
    if done == 1 {
        Ok(())
    } else {
        Err(LedgerError::Corrupt(format!(
            "grant {grant} could not be updated ({sql})"
        )))
    }
}

pub(crate) const RETURN: &str = "UPDATE grants SET remaining = remaining + $2 WHERE id = $1";

pub(crate) const EXPIRE_RETURNED: &str = "UPDATE grants SET expired = expired + $2 WHERE id = $1";

pub(crate) const EXPIRE_REMAINING: &str = "UPDATE grants SET expired = expired + remaining, remaining = 0 WHERE id = $1 AND remaining = $2";

/// Brings the account up to `now` and returns its spendable grants.
pub(crate) async fn bring_up_to_date(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    acct: &mut Locked,
) -> Result<Vec<OpenGrant>> {
    let open = open_grants(tx, acct.account.id).await?;
    bring_up_to_date_with(tx, ctx, acct, open).await
}

/// `bring_up_to_date` with the account's open grants already loaded.
pub(crate) async fn bring_up_to_date_with(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    acct: &mut Locked,
    open: Vec<OpenGrant>,
) -> Result<Vec<OpenGrant>> {
    let mut live = Vec::new();
    for g in open {
        if g.is_expired(ctx.now) {
            exec_grant_update(tx, EXPIRE_REMAINING, g.id, g.remaining).await?;
            acct.expired(g.id, Some(g.kind), g.remaining)?;
        } else {
            live.push(g);
        }
    }
    if let Some(allowance) = acct.allowance(ctx.pricing) {
        let cycle = billing_cycle(acct.account.cycle_anchor, ctx.now);
        if acct.renewed_cycle.is_none_or(|r| r < cycle.start) {
            let source = format!("sub:{}:{}", acct.account.id, cycle.start.millis());
            let spec = GrantSpec {
                kind: CreditKind::Subscription,
                amount: allowance,
                expires_at: Some(cycle.end),
                source: &source,
                fingerprint: &source,
            };
            if let Some(g) = insert_grant(tx, acct, ctx.now, &spec).await? {
                live.push(OpenGrant {
                    id: g.id,
                    kind: g.kind,
                    remaining: g.remaining,
                    granted_at: g.granted_at,
                    expires_at: g.expires_at,
                });
            }
            acct.renewed_cycle = Some(cycle.start);
            acct.next_renewal = Some(cycle.end);
        }
    }
    Ok(live)
}

/// Buys a top-up pack. Idempotent by payment reference: the same reference for the same account
/// and pack returns the original grant; for anything else it is a conflict.
pub async fn topup(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    pack: &str,
    payment_ref: &str,
) -> Result<Grant> {
    let pack = ctx
        .pricing
        .pack(pack)
        .ok_or_else(|| LedgerError::UnknownPack {
            pack: pack.to_owned(),
            expected: ctx
                .pricing
                .packs()
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    check_key(payment_ref, "payment reference")?;
    let mut acct = lock(tx, id).await?;
    let source = format!("topup:{payment_ref}");
    let fingerprint = format!("{id}:{}:{}", pack.id, pack.credits);
    if let Some((g, fp)) = grant_by_source(tx, &source).await? {
        return if fp == fingerprint {
            Ok(g)
        } else {
            Err(LedgerError::PaymentRefConflict(payment_ref.to_owned()))
        };
    }
    bring_up_to_date(tx, ctx, &mut acct).await?;
    let spec = GrantSpec {
        kind: CreditKind::TopUp,
        amount: pack.credits,
        expires_at: None,
        source: &source,
        fingerprint: &fingerprint,
    };
    let grant = match insert_grant(tx, &mut acct, ctx.now, &spec).await? {
        Some(g) => g,
        // Another account's transaction took this reference between our check and insert.
        None => return Err(LedgerError::PaymentRefConflict(payment_ref.to_owned())),
    };
    save(tx, &mut acct, ctx.now).await?;
    Ok(grant)
}

/// Grants `amount` credits that never expire (an operator action: a goodwill credit, a manual
/// purchase), as a top-up. Idempotent by `reference`: the same reference for the same account
/// and amount returns the original grant; anything else is a conflict.
pub async fn admin_grant(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    amount: Credits,
    reference: &str,
) -> Result<Grant> {
    if amount.is_zero() {
        return Err(Credits::positive(0).unwrap_err().into());
    }
    check_key(reference, "grant reference")?;
    let mut acct = lock(tx, id).await?;
    let source = format!("admin:{reference}");
    let fingerprint = format!("{id}:{amount}");
    if let Some((g, fp)) = grant_by_source(tx, &source).await? {
        return if fp == fingerprint {
            Ok(g)
        } else {
            Err(LedgerError::PaymentRefConflict(reference.to_owned()))
        };
    }
    bring_up_to_date(tx, ctx, &mut acct).await?;
    let spec = GrantSpec {
        kind: CreditKind::TopUp,
        amount,
        expires_at: None,
        source: &source,
        fingerprint: &fingerprint,
    };
    let Some(grant) = insert_grant(tx, &mut acct, ctx.now, &spec).await? else {
        return Err(LedgerError::PaymentRefConflict(reference.to_owned()));
    };
    save(tx, &mut acct, ctx.now).await?;
    Ok(grant)
}

pub async fn renew(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId) -> Result<Vec<Grant>> {
    let mut acct = lock(tx, id).await?;
    let before = acct.entries.len();
    bring_up_to_date(tx, ctx, &mut acct).await?;
    let mut new = Vec::new();
    for e in &acct.entries[before..] {
        if let (EntryType::Grant, Some(g)) = (e.entry, e.grant_id) {
            let row: Option<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE id = $1")
                .bind(g.0)
                .fetch_optional(&mut **c)
                .await?);
            if let Some(row) = row {
                new.push(row.into_grant()?);
            }
        }
    }
    save(tx, &mut acct, ctx.now).await?;
    Ok(new)
}

/// Accounts with a renewal or an expiry due at `now`. Only subscription grants expire, and they
/// expire when the cycle renews, so the renewal date covers both.
pub async fn due_accounts(tx: &mut Tx, now: Timestamp, limit: u32) -> Result<Vec<AccountId>> {
    let ids: Vec<String> = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT id FROM accounts WHERE next_renewal_ms <= $1 ORDER BY next_renewal_ms LIMIT $2",
    )
    .bind(now.millis())
    .bind(i64::from(limit))
    .fetch_all(&mut **c)
    .await?);
    ids.iter().map(|s| parse(s, "account id")).collect()
}

/// Every grant of the account, oldest first.
pub async fn grants(tx: &mut Tx, id: AccountId) -> Result<Vec<Grant>> {
    account(tx, id).await?;
    let rows: Vec<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE account_id = $1 ORDER BY id")
        .bind(id.to_string())
        .fetch_all(&mut **c)
        .await?);
    rows.into_iter().map(GrantRow::into_grant).collect()
}
