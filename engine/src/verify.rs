//! `wardflow verify`: recomputes the audit-trail leaves from the store,
//! checks them against the anchored batch roots, and the anchors against
//! the anchor log's signatures and chain (docs/ledger.md).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;

use std::io::Write as _;

use anyhow::Context as _;
use clap::Args;
use wardflow_ledger_bridge::{
    Anchor, AnchorLog, Hash, LeafIndex, NodeKey, Verdict, anchor_log_path, check_batch,
    leaf_index_path, prove,
};
use wardflow_storage::export::{AccessRow, ProofStatus};
use wardflow_storage::leaves::{Table, scan_rows};

use crate::config::Config;
use crate::output::{format_time, parse_time};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only the batches holding this patient's readings (with --from/--to,
    /// those of that time); each of the readings' inclusion proofs is checked
    #[arg(long)]
    pub patient: Option<String>,
    /// Readings measured from this time (RFC 3339, a date, now, or -15m / -2h / -1d)
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Readings measured before this time
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Only this batch
    #[arg(long, conflicts_with = "patient")]
    pub batch: Option<u64>,
    /// Only this process's batches [default: every process with an anchor log]
    #[arg(long)]
    pub process: Option<u32>,
    /// Print problems and the summary only, not every verified batch
    #[arg(long, short)]
    pub quiet: bool,
    /// Check the chain anchors on this endpoint [default: ledger.url]
    #[arg(long, value_name = "URL")]
    pub chain: Option<String>,
}

/// How many epochs of batches are recomputed in one pass over the files.
const WINDOW_MS: u64 = 10 * 60 * 1000;

/// Runs the check; an error if anything did not verify.
pub fn run(config: &Config, args: &VerifyArgs) -> anyhow::Result<()> {
    let dir = config.ledger_dir();
    let key = NodeKey::load(&config.ledger_key_file())
        .context("reading the node key")?
        .map(|k| k.public_key());
    let processes = match args.process {
        Some(p) => vec![p],
        None => anchored_processes(&dir)?,
    };
    if processes.is_empty() {
        anyhow::bail!("{}: no anchor log; nothing was sealed yet", dir.display());
    }
    let mut failures = 0usize;
    for process in processes {
        failures += verify_process(config, args, process, key.as_ref())?;
    }
    if failures > 0 {
        anyhow::bail!("verification failed: {failures} problem(s)");
    }
    Ok(())
}

fn anchored_processes(dir: &Path) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| dir.display().to_string()),
    };
    for e in entries {
        let name = e?.file_name();
        if let Some(p) = name
            .to_str()
            .and_then(|n| n.strip_prefix("anchors-p"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse().ok())
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The problems found in one process's batches.
fn verify_process(
    config: &Config,
    args: &VerifyArgs,
    process: u32,
    key: Option<&[u8; 32]>,
) -> anyhow::Result<usize> {
    let dir = config.ledger_dir();
    let log = anchor_log_path(&dir, process);
    let anchors = match AnchorLog::read(&log, key) {
        Ok(a) => a,
        Err(e) => {
            println!("process {process}: the anchor log does not verify: {e}");
            return Ok(1);
        }
    };
    let (Some(first), Some(last)) = (anchors.first(), anchors.last()) else {
        println!("process {process}: no batches sealed yet");
        return Ok(0);
    };
    println!(
        "process {process}: {} batches in the local anchor log, signatures and chain verify{}",
        anchors.len(),
        if key.is_some() {
            ", signed by this node's key"
        } else {
            " (no node key here to compare the signer with)"
        }
    );
    let root = &config.data_dir;
    let interval = config.storage.flush_interval_ms;
    let (p, all) = (process as usize, &Table::ALL[..]);

    // Which batches, and for a patient, which of their leaves to prove.
    let mut patient_leaves: BTreeMap<u64, Vec<Hash>> = BTreeMap::new();
    let selected: Vec<&Anchor> = if let Some(n) = args.batch {
        let a: Vec<&Anchor> = anchors.iter().filter(|a| a.batch == n).collect();
        if a.is_empty() {
            println!(
                "process {process}: no batch {n} (batches 0 to {} are sealed)",
                last.batch
            );
            return Ok(1);
        }
        a
    } else if let Some(patient) = &args.patient {
        let from = args
            .from
            .as_deref()
            .map(|s| parse_time("--from", s))
            .transpose()?;
        let to = args
            .to
            .as_deref()
            .map(|s| parse_time("--to", s))
            .transpose()?;
        let mut unsealed = 0u64;
        scan_rows(root, p, &[Table::Readings], 0..u64::MAX, interval, |r| {
            let t = r.time_ns("time").unwrap_or(i64::MIN);
            if r.string("patient_id") == Some(patient.as_str())
                && from.is_none_or(|f| t >= f)
                && to.is_none_or(|e| t < e)
            {
                match batch_of(&anchors, r.epoch) {
                    Some(i) => patient_leaves.entry(i as u64).or_default().push(r.leaf),
                    None => unsealed += 1,
                }
            }
        })?;
        if unsealed > 0 {
            println!(
                "process {process}: {unsealed} of {patient}'s readings are not sealed yet (stored after the last batch, or before the ledger began)"
            );
        }
        patient_leaves
            .keys()
            .map(|&i| &anchors[i as usize])
            .collect()
    } else {
        anchors.iter().collect()
    };
    let wanted: HashSet<u64> = selected.iter().map(|a| a.batch).collect();
    let index = LeafIndex::read(&leaf_index_path(&dir, process), |b| wanted.contains(&b))?;
    // Alert transitions and accesses, from the ledger's event log.
    let events = event_leaves(config, process)?;

    // Partitions dropped by retention: their batches cannot be recomputed.
    let drops: Vec<_> = wardflow_storage::retention::read_log(root)?
        .into_iter()
        .filter(|d| d.process == p)
        .collect();
    // The drops that may have held rows of a batch, and how many rows.
    let expired_in = |a: &Anchor| {
        let hit: Vec<_> = drops
            .iter()
            .filter(|d| d.min_epoch < a.to_ms && d.max_epoch + interval > a.from_ms)
            .collect();
        let rows: u64 = hit.iter().map(|d| d.rows).sum();
        hit.first().map(|d| (*d, rows))
    };
    let mut problems = 0;
    let mut verified = 0;
    let mut expired = 0;
    let mut proven = 0u64;
    for window in windows(&selected) {
        let leaves = recompute(root, p, interval, &window, &events)?;
        for (anchor, recomputed) in window.iter().zip(leaves) {
            let span = format!(
                "{} .. {}",
                format_time(anchor.from_ms as i64 * 1_000_000),
                format_time(anchor.to_ms as i64 * 1_000_000)
            );
            match check_batch(
                &anchor.header(),
                recomputed,
                index.get(&anchor.batch).map(Vec::as_slice),
            ) {
                Verdict::Verified(tree) => {
                    verified += 1;
                    if let Some(mine) = patient_leaves.get(&anchor.batch) {
                        for leaf in mine {
                            if prove(&tree, leaf, &anchor.root) {
                                proven += 1;
                            } else {
                                problems += 1;
                                println!("batch {}: an inclusion proof failed", anchor.batch);
                            }
                        }
                    }
                    if !args.quiet {
                        println!(
                            "batch {} [{span}) {} leaves: verified",
                            anchor.batch, anchor.leaves
                        );
                    }
                }
                Verdict::Mismatch(m)
                    if m.unsealed.is_empty()
                        && let Some(missing) = m.missing
                        && let Some((d, dropped)) = expired_in(anchor)
                        && (1..=dropped).contains(&missing) =>
                {
                    // Rows gone by retention, and nothing else changed: every
                    // row still stored was sealed in this batch.
                    expired += 1;
                    println!(
                        "batch {} [{span}): {} of {} sealed rows expired ({} {} dropped at {} under a retention of {} h); the rest are as sealed",
                        anchor.batch,
                        missing,
                        anchor.leaves,
                        d.table,
                        d.partition,
                        format_time(d.dropped_at_ns),
                        d.retention_ns / 3_600_000_000_000
                    );
                }
                Verdict::Mismatch(m) => {
                    problems += 1;
                    println!(
                        "batch {} [{span}): DOES NOT VERIFY: {} leaves sealed, {} recomputed from the store",
                        anchor.batch, anchor.leaves, m.recomputed
                    );
                    match m.missing {
                        None => println!(
                            "  the leaf index does not hold this batch: which rows differ is unknown"
                        ),
                        Some(missing) => {
                            report_unsealed(root, p, interval, anchor, &m.unsealed, &events)?;
                            if missing > 0 {
                                println!(
                                    "  {missing} sealed row(s) are no longer in the store (deleted, or altered as above)"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    if args.batch.is_none() && args.patient.is_none() {
        let mut before = 0u64;
        let mut after = 0u64;
        scan_rows(root, p, all, 0..first.from_ms, interval, |_| before += 1)?;
        scan_rows(root, p, all, last.to_ms..u64::MAX, interval, |_| after += 1)?;
        after += events.iter().filter(|e| e.epoch >= last.to_ms).count() as u64;
        if before > 0 {
            println!(
                "process {process}: {before} stored rows predate the first batch (stored before the ledger began): not covered"
            );
        }
        if after > 0 {
            println!(
                "process {process}: {after} stored rows are newer than the last batch (not sealed yet)"
            );
        }
        problems += check_alert_log_coverage(config, process, &events);
    }
    if let Some(patient) = &args.patient {
        println!(
            "process {process}: {proven} of {patient}'s readings proven included in anchored batches"
        );
    }
    problems += check_chain(config, args, process, &selected)?;
    if expired > 0 {
        println!("process {process}: {expired} batches hold rows expired by retention");
    }
    println!(
        "process {process}: {verified} of {} batches verified, {problems} problem(s)",
        selected.len()
    );
    Ok(problems)
}

/// Checks the selected batches' chain receipts against the chain: each
/// batch's remark must be in the recorded block and extrinsic, signed by
/// the node's account. Returns the problems found.
fn check_chain(
    config: &Config,
    args: &VerifyArgs,
    process: u32,
    selected: &[&Anchor],
) -> anyhow::Result<usize> {
    use wardflow_ledger_bridge::chain::{self, OnChain};
    let receipts = chain::read_receipts(&chain::receipt_log_path(&config.ledger_dir(), process))?;
    let url = args.chain.clone().or_else(|| config.ledger.url.clone());
    let Some(url) = url else {
        if !receipts.is_empty() {
            println!(
                "process {process}: {} chain receipts not checked: give the chain with --chain URL or ledger.url",
                receipts.len()
            );
        }
        return Ok(0);
    };
    // The first receipt of each batch counts (anchoring is at least once).
    let mut by_receipt: BTreeMap<usize, Vec<&Anchor>> = BTreeMap::new();
    let mut unanchored = 0;
    for a in selected {
        match receipts.iter().position(|r| r.covers(a.batch)) {
            Some(i) => by_receipt.entry(i).or_default().push(a),
            None => unanchored += 1,
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut problems, mut on_chain) = (0, 0);
    rt.block_on(async {
        let api = match chain::connect(&url).await {
            Ok(api) => api,
            Err(e) => {
                println!("process {process}: cannot check the chain anchors: {e}");
                problems += 1;
                return;
            }
        };
        for (i, anchors) in &by_receipt {
            let r = &receipts[*i];
            match chain::check_receipt(&api, r, anchors).await {
                OnChain::Verified => {
                    on_chain += anchors.len();
                    if !args.quiet {
                        println!(
                            "batches {}..={} on chain: block #{} {} extrinsic {}",
                            anchors[0].batch,
                            anchors[anchors.len() - 1].batch,
                            r.block_number,
                            r.block_hash,
                            r.extrinsic_index
                        );
                    }
                }
                OnChain::Missing(why) => {
                    problems += 1;
                    println!("process {process}: NOT ON CHAIN: {why}");
                }
            }
        }
    });
    println!(
        "process {process}: {on_chain} of {} batches verified on the chain at {url}{}",
        selected.len(),
        if unanchored > 0 {
            format!(", {unanchored} not anchored there yet (queued)")
        } else {
            String::new()
        }
    );
    Ok(problems)
}

/// The index of the batch whose epoch range holds `epoch`.
fn batch_of(anchors: &[Anchor], epoch: u64) -> Option<usize> {
    let i = anchors.partition_point(|a| a.to_ms <= epoch);
    (i < anchors.len() && anchors[i].from_ms <= epoch).then_some(i)
}

/// Runs of consecutive batches spanning at most [`WINDOW_MS`] of epochs,
/// each recomputed in one pass over its files.
fn windows<'a>(selected: &[&'a Anchor]) -> Vec<Vec<&'a Anchor>> {
    let mut out: Vec<Vec<&Anchor>> = Vec::new();
    for &a in selected {
        match out.last_mut() {
            Some(w)
                if w[w.len() - 1].to_ms == a.from_ms
                    && a.to_ms.saturating_sub(w[0].from_ms) <= WINDOW_MS =>
            {
                w.push(a)
            }
            _ => out.push(vec![a]),
        }
    }
    out
}

/// Names the first stored row whose leaf was never sealed in `anchor`.
/// The leaves of a run of consecutive batches, recomputed from the store
/// and the event log, by batch.
fn recompute(
    root: &Path,
    process: usize,
    interval: u64,
    window: &[&Anchor],
    events: &[EventLeaf],
) -> anyhow::Result<Vec<Vec<Hash>>> {
    let range = window[0].from_ms..window[window.len() - 1].to_ms;
    let mut leaves: Vec<Vec<Hash>> = vec![Vec::new(); window.len()];
    let mut place = |epoch: u64, leaf: Hash| {
        let i = window.partition_point(|a| a.to_ms <= epoch);
        if i < window.len() && window[i].from_ms <= epoch {
            leaves[i].push(leaf);
        }
    };
    scan_rows(root, process, &Table::ALL, range, interval, |r| {
        place(r.epoch, r.leaf)
    })?;
    for e in events {
        place(e.epoch, e.leaf);
    }
    Ok(leaves)
}

/// Every line of the alert log must have been recorded as an event: a line
/// between recorded ones that was not is one added afterwards. Lines
/// before the first recorded one predate the ledger; lines after the last
/// are not recorded yet. Returns the problems found.
fn check_alert_log_coverage(config: &Config, process: u32, events: &[EventLeaf]) -> usize {
    use wardflow_ledger_bridge::events::EventRecord;
    let recorded: HashSet<u64> = events
        .iter()
        .filter_map(|e| match e.record {
            EventRecord::Alert { offset, .. } => Some(offset),
            EventRecord::Access { .. } => None,
        })
        .collect();
    let (Some(&first), Some(&last)) = (recorded.iter().min(), recorded.iter().max()) else {
        return 0;
    };
    let path = crate::alerting::log_path(&config.data_dir, process as usize);
    let text = std::fs::read(&path).unwrap_or_default();
    let (mut offset, mut inserted, mut pending) = (0u64, Vec::new(), 0u64);
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.ends_with(b"\n") && !recorded.contains(&offset) {
            if offset > last {
                pending += 1;
            } else if offset > first {
                inserted.push((offset, line));
            }
        }
        offset += line.len() as u64;
    }
    if pending > 0 {
        println!(
            "process {process}: {pending} alert log line(s) after the last recorded one are not sealed yet"
        );
    }
    match inserted.first() {
        None => 0,
        Some((at, line)) => {
            println!(
                "process {process}: {} alert log line(s) were never sealed (written just before a crash, or added afterwards); the first, at byte {at}: {}",
                inserted.len(),
                String::from_utf8_lossy(line).trim_end()
            );
            1
        }
    }
}

/// A leaf of the ledger's event log, recomputed.
struct EventLeaf {
    epoch: u64,
    leaf: Hash,
    what: String,
    record: wardflow_ledger_bridge::events::EventRecord,
}

fn event_leaves(config: &Config, process: u32) -> anyhow::Result<Vec<EventLeaf>> {
    use wardflow_ledger_bridge::events::{
        AlertLogReader, EventRecord, event_log_path, read_events,
    };
    let alert_log = crate::alerting::log_path(&config.data_dir, process as usize);
    let mut reader = AlertLogReader::open(&alert_log);
    let shown = alert_log
        .strip_prefix(&config.data_dir)
        .unwrap_or(&alert_log)
        .display()
        .to_string();
    Ok(read_events(&event_log_path(&config.ledger_dir(), process))?
        .into_iter()
        .map(|r| {
            let leaf = r.leaf(&mut reader);
            let what = match &r {
                EventRecord::Alert { offset, len, .. } => format!(
                    "alert transition in {shown} at byte {offset}: {}",
                    String::from_utf8_lossy(&reader.line(*offset, *len))
                ),
                EventRecord::Access {
                    patient,
                    actor,
                    action,
                    purpose,
                    ..
                } => format!("access to {patient} by {actor}: {action} for {purpose}"),
            };
            EventLeaf {
                epoch: r.epoch(),
                leaf,
                what,
                record: r,
            }
        })
        .collect())
}

fn report_unsealed(
    root: &Path,
    process: usize,
    interval: u64,
    anchor: &Anchor,
    unsealed: &[Hash],
    events: &[EventLeaf],
) -> anyhow::Result<()> {
    if unsealed.is_empty() {
        return Ok(());
    }
    // In the batch's canonical order, so "the first" is well defined.
    let wanted: std::collections::HashMap<Hash, usize> =
        unsealed.iter().enumerate().map(|(i, h)| (*h, i)).collect();
    let mut found = Vec::new();
    let range: Range<u64> = anchor.from_ms..anchor.to_ms;
    scan_rows(root, process, &Table::ALL, range, interval, |r| {
        if let Some(&pos) = wanted.get(&r.leaf) {
            let table = match r.table {
                Table::Readings => "reading",
                Table::DeadLetters => "dead letter",
            };
            found.push((
                pos,
                format!(
                    "{table} in {} row {}: {}",
                    r.path.strip_prefix(root).unwrap_or(r.path).display(),
                    r.row,
                    r.describe()
                ),
            ));
        }
    })?;
    for e in events {
        if let Some(&pos) = wanted.get(&e.leaf) {
            found.push((pos, e.what.clone()));
        }
    }
    found.sort();
    println!(
        "  {} stored row(s) do not match what was sealed; the first:",
        unsealed.len()
    );
    if let Some((_, first)) = found.first() {
        println!("  {first}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The patient whose data was accessed
    #[arg(long)]
    pub patient: String,
    #[arg(long, value_enum, default_value_t = crate::output::Format::Table)]
    pub format: crate::output::Format,
}

/// `wardflow audit --patient P`: every recorded access to the patient's
/// data, with its proof status.
pub fn audit(config: &Config, args: &AuditArgs) -> anyhow::Result<()> {
    let rows = access_log(config, &args.patient)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        crate::output::Format::Json => {
            #[derive(serde::Serialize)]
            struct AuditRow<'a> {
                at: String,
                actor: &'a str,
                action: &'a str,
                purpose: &'a str,
                detail: &'a str,
                proof: &'a str,
            }
            let rows: Vec<AuditRow> = rows
                .iter()
                .map(|r| AuditRow {
                    at: format_time(r.at_ns),
                    actor: &r.actor,
                    action: &r.action,
                    purpose: &r.purpose,
                    detail: &r.detail,
                    proof: &r.proof_detail,
                })
                .collect();
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        f => {
            let table = crate::output::Rows {
                header: vec!["time", "actor", "action", "purpose", "detail", "proof"],
                rows: rows
                    .iter()
                    .map(|r| {
                        vec![
                            format_time(r.at_ns),
                            r.actor.clone(),
                            r.action.clone(),
                            r.purpose.clone(),
                            r.detail.clone(),
                            r.proof_detail.clone(),
                        ]
                    })
                    .collect(),
            };
            if f == crate::output::Format::Csv {
                table.write_csv(&mut out)?;
            } else {
                table.write_table(&mut out)?;
            }
        }
    }
    Ok(())
}

/// Every recorded access to the patient's data, oldest first, with its
/// proof status: proven included in an anchored batch that verifies
/// against the store, in a batch that does not verify, recorded but not
/// sealed yet, or requested but not yet recorded by the engine.
pub(crate) fn access_log(config: &Config, patient: &str) -> anyhow::Result<Vec<AccessRow>> {
    use wardflow_ledger_bridge::chain;
    use wardflow_ledger_bridge::events::EventRecord;
    let dir = config.ledger_dir();
    let key = NodeKey::load(&config.ledger_key_file())
        .context("reading the node key")?
        .map(|k| k.public_key());
    let mut processes = anchored_processes(&dir)?;
    if !processes.contains(&0) {
        processes.insert(0, 0);
    }
    let mut rows: Vec<AccessRow> = Vec::new();
    let mut recorded = HashSet::new();
    for process in processes {
        let anchors = AnchorLog::read(&anchor_log_path(&dir, process), key.as_ref())
            .with_context(|| format!("process {process}: the anchor log does not verify"))?;
        let receipts = chain::read_receipts(&chain::receipt_log_path(&dir, process))?;
        let events = event_leaves(config, process)?;
        let mut by_batch: BTreeMap<Option<usize>, Vec<&EventLeaf>> = BTreeMap::new();
        for e in &events {
            if let EventRecord::Access {
                patient: p,
                request,
                ..
            } = &e.record
            {
                recorded.insert(request.clone());
                if p == patient {
                    by_batch
                        .entry(batch_of(&anchors, e.epoch))
                        .or_default()
                        .push(e);
                }
            }
        }
        for (batch, mine) in by_batch {
            let proofs: Vec<(ProofStatus, String)> = match batch {
                None => {
                    vec![(ProofStatus::NotSealed, "recorded, not sealed yet".into()); mine.len()]
                }
                Some(i) => {
                    let a = &anchors[i];
                    let leaves = recompute(
                        &config.data_dir,
                        process as usize,
                        config.storage.flush_interval_ms,
                        &[a],
                        &events,
                    )?
                    .pop()
                    .unwrap_or_default();
                    let on_chain = receipts
                        .iter()
                        .find(|r| r.covers(a.batch))
                        .map(|r| format!(", anchored on chain in block #{}", r.block_number))
                        .unwrap_or_default();
                    match check_batch(&a.header(), leaves, None) {
                        Verdict::Verified(tree) => mine
                            .iter()
                            .map(|e| {
                                if prove(&tree, &e.leaf, &a.root) {
                                    (
                                        ProofStatus::Proven,
                                        format!(
                                            "proven in batch {} of process {process}{on_chain}",
                                            a.batch
                                        ),
                                    )
                                } else {
                                    (
                                        ProofStatus::NotInBatch,
                                        format!("NOT in batch {} of process {process}", a.batch),
                                    )
                                }
                            })
                            .collect(),
                        Verdict::Mismatch(_) => vec![
                            (
                                ProofStatus::BatchMismatch,
                                format!(
                                    "batch {} of process {process} DOES NOT VERIFY (see wardflow verify)",
                                    a.batch
                                )
                            );
                            mine.len()
                        ],
                    }
                }
            };
            for (e, (proof, proof_detail)) in mine.into_iter().zip(proofs) {
                if let EventRecord::Access {
                    at_ns,
                    actor,
                    action,
                    purpose,
                    detail,
                    ..
                } = &e.record
                {
                    rows.push(AccessRow {
                        at_ns: *at_ns,
                        actor: actor.clone(),
                        action: action.clone(),
                        purpose: purpose.clone(),
                        detail: detail.clone(),
                        proof,
                        proof_detail,
                    });
                }
            }
        }
    }
    // Requests the engine has not recorded yet.
    let mut tail = wardflow_ledger_bridge::events::RequestTail::new(&dir);
    for r in tail.poll() {
        if r.patient == patient && !recorded.contains(&r.id) {
            rows.push(AccessRow {
                at_ns: r.at_ns,
                actor: r.actor,
                action: r.action,
                purpose: r.purpose,
                detail: r.detail,
                proof: ProofStatus::NotRecorded,
                proof_detail: "requested, not recorded yet (the engine records it when it runs)"
                    .into(),
            });
        }
    }
    rows.sort_by_key(|r| r.at_ns);
    Ok(rows)
}
