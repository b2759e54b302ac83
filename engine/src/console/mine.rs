//! The patient's own page: their consents (listed from the consent book,
//! granted and revoked with records the patient signs in the browser) and
//! the access log of their data with its proof status.
//!
//! The server never holds a patient's key. It builds the consent record,
//! the browser signs the record's bytes with the patient's sr25519 key,
//! and the server checks the signature against the account registered
//! for the patient before appending the signed record to the local
//! consent log, which the engine follows like a chain. With a chain
//! configured, a consent record is an extrinsic the patient's own wallet
//! must sign and pay for: the console then gives the command that does it.

use std::path::Path;

use ntex::util::Bytes;
use ntex::web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use wardflow_ledger_bridge::consent::{
    AccountRegistry, ConsentRecord, SCOPES, Terms, check_terms, grant_id, unhex,
};
use wardflow_ledger_bridge::follow::{LocalRecord, load_book, local_log_path};
use wardflow_ledger_bridge::{hex, now_ms};

use super::{Role, Session, State, json_request, ok_json};
use crate::api::error;

/// Checks an sr25519 signature (context `substrate`) of `message` by the
/// account registered for `patient`.
pub(super) fn signed_by_patient(
    ledger: &Path,
    patient: &str,
    message: &[u8],
    signature_hex: &str,
) -> Result<[u8; 32], String> {
    let registry = AccountRegistry::load(ledger).map_err(|e| e.to_string())?;
    let account: [u8; 32] = registry
        .patient(patient)
        .and_then(unhex)
        .and_then(|a| a.try_into().ok())
        .ok_or_else(|| format!("no account is registered for patient {patient}"))?;
    let signature: [u8; 64] = unhex(signature_hex.trim_start_matches("0x"))
        .and_then(|s| s.try_into().ok())
        .ok_or("the signature is not 64 bytes of hex")?;
    if subxt_signer::sr25519::verify(
        &subxt_signer::sr25519::Signature(signature),
        message,
        &subxt_signer::sr25519::PublicKey(account),
    ) {
        Ok(account)
    } else {
        Err("the signature is not the patient's".into())
    }
}

fn patient_session(
    console: &super::Console,
    req: &HttpRequest,
) -> Result<std::sync::Arc<Session>, HttpResponse> {
    let s = console.session(req)?;
    if s.role != Role::Patient {
        return Err(error(403, "this page is the patient's own"));
    }
    Ok(s)
}

pub(super) async fn consents(console: State, req: HttpRequest) -> HttpResponse {
    let s = match patient_session(&console, &req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let dir = console.config.ledger_dir();
    let book = match ntex::rt::spawn_blocking(move || load_book(&dir)).await {
        Ok(Ok((book, _))) => book,
        Ok(Err(e)) => return error(500, &e.to_string()),
        Err(_) => return error(500, "the consent book could not be read"),
    };
    let now = now_ms();
    let rows: Vec<_> = book
        .grants()
        .filter(|g| g.terms.patient == s.id)
        .map(|g| {
            json!({
                "id": g.id,
                "grantee": g.terms.grantee,
                "purpose": g.terms.purpose,
                "scope": g.terms.scope,
                "not_after": g.terms.not_after_ms,
                "may_delegate": g.terms.may_delegate,
                "parent": g.parent,
                "block": g.block,
                "recorded": g.block_ms,
                "revoked": g.revoked_at.is_some(),
                "in_force": g.holds_at(now),
            })
        })
        .collect();
    ok_json(rows)
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Prepare {
    Revoke {
        grant: String,
    },
    Grant {
        grantee: String,
        purpose: String,
        scope: Vec<String>,
        days: u32,
    },
}

pub(super) async fn prepare(console: State, req: HttpRequest, body: Bytes) -> HttpResponse {
    if let Err(r) = json_request(&req) {
        return r;
    }
    let s = match patient_session(&console, &req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let ask: Prepare = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return error(400, &format!("not a consent request: {e}")),
    };
    let (record, summary) = match ask {
        Prepare::Revoke { grant } => {
            let dir = console.config.ledger_dir();
            let book = match ntex::rt::spawn_blocking(move || load_book(&dir)).await {
                Ok(Ok((b, _))) => b,
                Ok(Err(e)) => return error(500, &e.to_string()),
                Err(_) => return error(500, "the consent book could not be read"),
            };
            match book.get(&grant) {
                Some(g) if g.terms.patient == s.id && g.revoked_at.is_none() => {}
                Some(g) if g.terms.patient == s.id => {
                    return error(409, &format!("grant {grant} is revoked already"));
                }
                _ => return error(404, &format!("no grant {grant} of yours")),
            }
            let summary = format!("revoke grant {grant}");
            (
                ConsentRecord::Revoke {
                    patient: s.id.clone(),
                    grant,
                },
                summary,
            )
        }
        Prepare::Grant {
            grantee,
            purpose,
            scope,
            days,
        } => {
            if !(1..=3650).contains(&days) {
                return error(400, "days is 1 to 3650");
            }
            let mut nonce = [0u8; 8];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
            let terms = Terms {
                patient: s.id.clone(),
                grantee,
                purpose,
                scope,
                not_after_ms: now_ms() + days as u64 * 86_400_000,
                may_delegate: false,
                nonce: u64::from_le_bytes(nonce),
            };
            if let Err(e) = check_terms(&terms) {
                return error(400, &format!("{e} (scopes: {})", SCOPES.join(", ")));
            }
            let summary = format!(
                "grant {} access to {} for {} for {days} days",
                terms.grantee,
                terms.scope.join(", "),
                terms.purpose
            );
            (ConsentRecord::Grant(terms), summary)
        }
    };
    ok_json(json!({ "payload": hex(&record.payload()), "summary": summary }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed {
    payload: String,
    signature: String,
}

pub(super) async fn submit(console: State, req: HttpRequest, body: Bytes) -> HttpResponse {
    if let Err(r) = json_request(&req) {
        return r;
    }
    let s = match patient_session(&console, &req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let signed: Signed = match serde_json::from_slice(&body) {
        Ok(x) => x,
        Err(e) => return error(400, &format!("not a signed consent record: {e}")),
    };
    let Some(payload) = unhex(&signed.payload) else {
        return error(400, "the payload is not hex");
    };
    let record = match ConsentRecord::decode(&payload) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return error(400, &e),
        None => return error(400, "the payload is not a consent record"),
    };
    if record.patient() != s.id || matches!(record, ConsentRecord::Delegate { .. }) {
        return error(403, "a patient signs their own grants and revocations only");
    }
    let ledger = console.config.ledger_dir();
    let checked = {
        let (ledger, patient, payload, signature) = (
            ledger.clone(),
            s.id.clone(),
            payload.clone(),
            signed.signature.clone(),
        );
        ntex::rt::spawn_blocking(move || signed_by_patient(&ledger, &patient, &payload, &signature))
            .await
    };
    let account = match checked {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return error(400, &e),
        Err(_) => return error(500, "the signature could not be checked"),
    };
    let id = grant_id(&account, &payload);
    if console.config.ledger.url.is_some() {
        let cli = match &record {
            ConsentRecord::Revoke { grant, .. } => format!(
                "wardflow consent revoke --key <your key file> --patient {} --grant {grant}",
                s.id
            ),
            ConsentRecord::Grant(t) => format!(
                "wardflow consent grant --key <your key file> --patient {} --to {} --purpose {} --scope {} --minutes {}",
                s.id,
                shell_quote(&t.grantee),
                shell_quote(&t.purpose),
                shell_quote(&t.scope.join(",")),
                t.not_after_ms.saturating_sub(now_ms()) / 60_000
            ),
            ConsentRecord::Delegate { .. } => unreachable!("refused above"),
        };
        return HttpResponse::Conflict()
            .content_type("application/json")
            .body(
                json!({
                    "error": "with a chain, your wallet submits consent records: run this",
                    "cli": cli,
                })
                .to_string(),
            );
    }
    let record = LocalRecord {
        signer: hex(&account),
        payload: signed.payload,
        signature: signed.signature.trim_start_matches("0x").to_string(),
        at_ms: now_ms(),
    };
    let path = local_log_path(&ledger);
    let written = ntex::rt::spawn_blocking(move || {
        wardflow_ledger_bridge::anchor::append_json_lines(&path, &[record])
    })
    .await;
    match written {
        Ok(Ok(())) => ok_json(json!({ "id": id })),
        _ => error(500, "the consent record could not be written"),
    }
}

/// `s` as one shell word (single-quoted unless it is plain).
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:,/@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub(super) async fn access_log(console: State, req: HttpRequest) -> HttpResponse {
    let s = match patient_session(&console, &req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let config = console.config.clone();
    let patient = s.id.clone();
    let rows = ntex::rt::spawn_blocking(move || crate::verify::access_log(&config, &patient)).await;
    match rows {
        Ok(Ok(rows)) => ok_json(
            rows.iter()
                .map(|r| {
                    json!({
                        "at": r.at_ns / 1_000_000,
                        "actor": r.actor,
                        "action": r.action,
                        "purpose": r.purpose,
                        "detail": r.detail,
                        "proof": r.proof_detail,
                    })
                })
                .collect::<Vec<_>>(),
        ),
        Ok(Err(e)) => error(500, &format!("{e:#}")),
        Err(_) => error(500, "the access log could not be read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The browser derives a patient's key from the seed in their key
    /// file with @scure/sr25519 (`secretFromSeed`, schnorrkel's Ed25519
    /// expansion); this is the public key it derives from the seed
    /// 0x00…01, which must be the account the server checks against.
    #[test]
    fn the_browser_and_the_server_derive_the_same_account() {
        let seed = format!("0x{}01", "00".repeat(31));
        let key = wardflow_ledger_bridge::chain::load_signer(&seed).unwrap();
        assert_eq!(
            hex(&key.public_key().0),
            "3a3d45dc55b57bf542f4c6ff41af080ec675317f4ed50ae1d2713bf9f892692d"
        );
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("rn-b"), "rn-b");
        assert_eq!(shell_quote("research:s1"), "research:s1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_signature_counts_only_from_the_registered_account() {
        let dir = tempfile::tempdir().unwrap();
        let bob =
            wardflow_ledger_bridge::chain::load_signer(&format!("0x{}", "11".repeat(32))).unwrap();
        let eve =
            wardflow_ledger_bridge::chain::load_signer(&format!("0x{}", "22".repeat(32))).unwrap();
        AccountRegistry::register(dir.path(), "patient:p-1", &bob.public_key().0).unwrap();
        let msg = b"wardflow-console-login:p-1:00";
        let good = hex(&bob.sign(msg).0);
        assert!(signed_by_patient(dir.path(), "p-1", msg, &good).is_ok());
        assert!(signed_by_patient(dir.path(), "p-1", b"another message", &good).is_err());
        let bad = hex(&eve.sign(msg).0);
        assert!(signed_by_patient(dir.path(), "p-1", msg, &bad).is_err());
        assert!(
            signed_by_patient(dir.path(), "p-2", msg, &good).is_err(),
            "no account"
        );
        assert!(signed_by_patient(dir.path(), "p-1", msg, "zz").is_err());
    }
}
