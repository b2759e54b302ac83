//! Consent in the running engine and on the command line.
//!
//! With a chain configured, process 0 follows its finalized blocks for the
//! consent records patients sign ([`wardflow_ledger_bridge::follow`]): each
//! grant, delegation or revocation the book accepts opens or closes an
//! access in the dataflow's consent collection, and every record, accepted
//! or refused, is an access leaf of the audit trail (action
//! `consent-grant`, `consent-delegate`, `consent-revoke` or
//! `consent-refused`, with the consent version or the reason).
//!
//! `wardflow consent grant|delegate|revoke` stand in for a patient's (or a
//! delegating clinician's) wallet: they sign the record with the key file
//! given and submit it, and print the grant id once it is finalized.
//! `wardflow consent register` records a patient's or clinician's account,
//! `keygen` makes a key file, `list` shows the grants the engine has read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use crossbeam_channel::Sender;
use wardflow_ledger_bridge::chain::{load_signer, submit_remark_blocking};
use wardflow_ledger_bridge::consent::{
    AccountRegistry, ConsentRecord, Decision, Terms, check_terms, grant_id,
};
use wardflow_ledger_bridge::events::AccessRequest;
use wardflow_ledger_bridge::follow::{
    ConsentEvent, ConsentFollower, Decided, LocalRecord, load_book, local_log_path,
};
use wardflow_ledger_bridge::hex;

use crate::config::Config;
use crate::dataflow::ConsentChange;
use crate::ledger::LedgerEvent;

/// Starts following the chain for consent records (process 0, chain
/// configured).
pub fn start_follower(
    config: &Config,
    url: Option<&str>,
    changes: Sender<ConsentChange>,
    events: Sender<LedgerEvent>,
) -> anyhow::Result<ConsentFollower> {
    let report = move |e| match e {
        ConsentEvent::InForce(accesses) => {
            for a in accesses {
                let _ = changes.send(ConsentChange::Open(a));
            }
        }
        ConsentEvent::Decided(d) => {
            let Decided {
                seen,
                record,
                decision,
            } = *d;
            let (action, purpose, detail) = match (&decision, &record) {
                (Decision::Opened { access, .. }, Some(ConsentRecord::Delegate { .. })) => {
                    ("consent-delegate", access.purpose.clone(), describe(access))
                }
                (Decision::Opened { access, .. }, _) => {
                    ("consent-grant", access.purpose.clone(), describe(access))
                }
                (Decision::Closed { id, ended }, _) => (
                    "consent-revoke",
                    String::new(),
                    format!("grant {id}, {} access(es) ended", ended.len()),
                ),
                (Decision::Refused { reason }, _) => {
                    ("consent-refused", String::new(), reason.clone())
                }
            };
            match decision {
                Decision::Opened { access, .. } => {
                    let _ = changes.send(ConsentChange::Open(access));
                }
                Decision::Closed { ended, .. } => {
                    for a in ended {
                        let _ = changes.send(ConsentChange::Close(a));
                    }
                }
                Decision::Refused { .. } => {}
            }
            let access = AccessRequest {
                id: format!("consent-{}-{}", seen.block, seen.extrinsic),
                at_ns: wardflow_model::now_ns(),
                patient: record
                    .as_ref()
                    .map(|r| r.patient().to_string())
                    .unwrap_or_default(),
                actor: format!("account:{}", seen.signer),
                action: action.into(),
                purpose,
                detail: format!(
                    "block #{} extrinsic {}: {detail}",
                    seen.block, seen.extrinsic
                ),
            };
            let _ = events.send(LedgerEvent::Access(access));
        }
    };
    let dir = config.ledger_dir();
    Ok(match url {
        Some(url) => ConsentFollower::start(
            url.to_string(),
            &dir,
            config.ledger.consent_from_block,
            Duration::from_millis(500),
            report,
        )?,
        None => ConsentFollower::start_local(&dir, Duration::from_millis(200), report)?,
    })
}

fn describe(a: &wardflow_ledger_bridge::consent::Access) -> String {
    format!(
        "{} may receive {} until {} ms (consent {})",
        a.grantee,
        a.scope.join(","),
        a.not_after_ms,
        a.version
    )
}

#[derive(Subcommand, Debug)]
pub enum ConsentCommand {
    /// Make a new sr25519 key file (a secret seed) and print its account
    Keygen {
        /// Where to write it (created owner-only; refused if it exists)
        #[arg(long)]
        out: PathBuf,
    },
    /// Record the chain account of a patient or clinician (what signs their consent records)
    Register(RegisterArgs),
    /// Sign and submit a grant with the patient's key
    Grant(GrantArgs),
    /// Sign and submit a narrower grant from a grant that may be delegated, with the grantee's key
    Delegate(DelegateArgs),
    /// Sign and submit the revocation of a grant
    Revoke(RevokeArgs),
    /// Print a patient's MQTT password (user name patient:<id>), signed with their key; good for five minutes
    Token {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        patient: String,
    },
    /// The grants the engine has read from the chain, with their state
    List {
        #[arg(long)]
        patient: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    #[arg(
        long,
        conflicts_with = "clinician",
        required_unless_present = "clinician"
    )]
    pub patient: Option<String>,
    #[arg(long)]
    pub clinician: Option<String>,
    /// The account's key file (only its public key is recorded)
    #[arg(long, conflicts_with = "account", required_unless_present = "account")]
    pub key: Option<PathBuf>,
    /// The account, 32-byte hex
    #[arg(long)]
    pub account: Option<String>,
}

#[derive(Args, Debug)]
pub struct ChainArgs {
    /// The signer's key file: a secret URI (`//Bob` on a development chain, a mnemonic, a 0x seed)
    #[arg(long)]
    pub key: PathBuf,
    /// The chain [default: ledger.url of the configuration]
    #[arg(long)]
    pub chain: Option<String>,
}

#[derive(Args, Debug)]
pub struct TermsArgs {
    #[arg(long)]
    pub patient: String,
    /// Who may receive the data: a clinician id, or a study id for research
    #[arg(long)]
    pub to: String,
    /// treatment, emergency or research:<study>
    #[arg(long, default_value = "treatment")]
    pub purpose: String,
    /// Comma-separated categories: all, alerts, vitals, observations
    #[arg(long, value_delimiter = ',', default_value = "alerts")]
    pub scope: Vec<String>,
    /// How long it holds, minutes from now
    #[arg(long, conflicts_with = "until", default_value_t = 24 * 60)]
    pub minutes: u64,
    /// When it ends (RFC 3339), instead of --minutes
    #[arg(long)]
    pub until: Option<String>,
    /// The grantee may pass on a narrower grant
    #[arg(long)]
    pub may_delegate: bool,
}

#[derive(Args, Debug)]
pub struct GrantArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    #[command(flatten)]
    pub terms: TermsArgs,
}

#[derive(Args, Debug)]
pub struct DelegateArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// The grant delegated from
    #[arg(long)]
    pub parent: String,
    #[command(flatten)]
    pub terms: TermsArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    #[arg(long)]
    pub patient: String,
    #[arg(long)]
    pub grant: String,
}

pub fn run(config: &Config, cmd: &ConsentCommand) -> anyhow::Result<()> {
    let dir = config.ledger_dir();
    match cmd {
        ConsentCommand::Keygen { out } => {
            if out.exists() {
                bail!("{} exists; not overwritten", out.display());
            }
            let suri = wardflow_ledger_bridge::chain::load_or_create_suri(out)?;
            let key = load_signer(&suri).map_err(anyhow::Error::msg)?;
            println!("account {}", hex(&key.public_key().0));
            Ok(())
        }
        ConsentCommand::Register(a) => {
            let account: [u8; 32] = match (&a.key, &a.account) {
                (Some(k), _) => read_key(k)?.public_key().0,
                (None, Some(h)) => wardflow_ledger_bridge::consent::unhex(h)
                    .and_then(|b| b.try_into().ok())
                    .context("--account: not a 32-byte hex account")?,
                (None, None) => bail!("give --key or --account"),
            };
            let subject = match (&a.patient, &a.clinician) {
                (Some(p), _) => format!("patient:{p}"),
                (None, Some(c)) => format!("clinician:{c}"),
                (None, None) => bail!("give --patient or --clinician"),
            };
            AccountRegistry::register(&dir, &subject, &account)?;
            println!("{subject} account {}", hex(&account));
            Ok(())
        }
        ConsentCommand::Grant(a) => {
            let record = ConsentRecord::Grant(terms(&a.terms)?);
            submit(config, &a.chain, &record)
        }
        ConsentCommand::Delegate(a) => {
            let record = ConsentRecord::Delegate {
                parent: a.parent.clone(),
                terms: terms(&a.terms)?,
            };
            submit(config, &a.chain, &record)
        }
        ConsentCommand::Revoke(a) => {
            let record = ConsentRecord::Revoke {
                patient: a.patient.clone(),
                grant: a.grant.clone(),
            };
            submit(config, &a.chain, &record)
        }
        ConsentCommand::Token { key, patient } => {
            println!(
                "{}",
                crate::emergency::login_password(&read_key(key)?, patient)
            );
            Ok(())
        }
        ConsentCommand::List { patient } => {
            let (book, _) = load_book(&dir)?;
            let now = wardflow_ledger_bridge::now_ms();
            println!("grant\tpatient\tgrantee\tpurpose\tscope\tnot_after_ms\tblock\tstate");
            for g in book.grants() {
                if patient.as_ref().is_some_and(|p| *p != g.terms.patient) {
                    continue;
                }
                let state = match g.revoked_at {
                    Some(b) => format!("revoked at block {b}"),
                    None if now >= g.terms.not_after_ms => "expired".into(),
                    None => "in force".into(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    g.id,
                    g.terms.patient,
                    g.terms.grantee,
                    g.terms.purpose,
                    g.terms.scope.join(","),
                    g.terms.not_after_ms,
                    g.block,
                    state
                );
            }
            Ok(())
        }
    }
}

fn read_key(path: &Path) -> anyhow::Result<wardflow_ledger_bridge::chain::Keypair> {
    let suri = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    load_signer(suri.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn terms(a: &TermsArgs) -> anyhow::Result<Terms> {
    let not_after_ms = match &a.until {
        Some(t) => {
            let ts: jiff::Timestamp = t.parse().context("--until: not an RFC 3339 time")?;
            ts.as_millisecond().max(0) as u64
        }
        None => wardflow_ledger_bridge::now_ms() + a.minutes * 60_000,
    };
    let t = Terms {
        patient: a.patient.clone(),
        grantee: a.to.clone(),
        purpose: a.purpose.clone(),
        scope: a.scope.clone(),
        not_after_ms,
        may_delegate: a.may_delegate,
        nonce: wardflow_ledger_bridge::now_ms(),
    };
    check_terms(&t).map_err(anyhow::Error::msg)?;
    Ok(t)
}

/// Appends `record`, signed with `key`, to the local consent log (no
/// chain); returns the grant id it creates.
pub fn record_locally(
    ledger_dir: &Path,
    key: &wardflow_ledger_bridge::chain::Keypair,
    record: &ConsentRecord,
) -> anyhow::Result<String> {
    let payload = record.payload();
    std::fs::create_dir_all(ledger_dir).with_context(|| ledger_dir.display().to_string())?;
    wardflow_ledger_bridge::anchor::append_json_lines(
        &local_log_path(ledger_dir),
        &[LocalRecord::sign(key, &payload)],
    )?;
    Ok(grant_id(&key.public_key().0, &payload))
}

/// Signs `record` with the key file and submits it; waits for finality.
/// Without a chain (local mode), appends it, signed, to the local consent
/// log the engine follows.
fn submit(config: &Config, chain: &ChainArgs, record: &ConsentRecord) -> anyhow::Result<()> {
    let key = read_key(&chain.key)?;
    let payload = record.payload();
    let id = grant_id(&key.public_key().0, &payload);
    let Some(url) = chain.chain.clone().or_else(|| config.ledger.url.clone()) else {
        record_locally(&config.ledger_dir(), &key, record)?;
        match record {
            ConsentRecord::Revoke { grant, .. } => println!("revocation of {grant}"),
            _ => println!("grant {id}"),
        }
        println!("recorded in the local consent log (no chain configured)");
        return Ok(());
    };
    let (block_hash, block, extrinsic) = submit_remark_blocking(
        &url,
        &key,
        payload,
        Duration::from_secs(config.ledger.finality_timeout_s.max(1)),
    )
    .map_err(anyhow::Error::msg)?;
    match record {
        ConsentRecord::Revoke { grant, .. } => println!("revocation of {grant}"),
        _ => println!("grant {id}"),
    }
    println!("finalized in block #{block} {block_hash} extrinsic {extrinsic}");
    Ok(())
}
