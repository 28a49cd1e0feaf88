//! Faults on the schedule, and what each did. Every fault is injected into the real processes,
//! files and sockets (signals, segment files, a full filesystem, a proxy in front of a node's
//! fabric port), and then checked from outside: the node must come back (and rejoin the
//! fabric), serve every block a `persist` save acknowledged, and never serve a corrupt one; a
//! peer's fetch through a cut or slow link must fall through and the link must serve again.
//! The engine-to-node link is covered by `restart_engine` and `kill_node`.

mod fabric;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pegaflow_actors::keys::BlockKey;
use rand::{Rng, SeedableRng};

use crate::cluster::signal;
use crate::proxy::LinkMode;
use crate::replay::{Event, Replay};
use crate::report::json::FaultRecord;
use crate::scenario::FaultKind;
pub(crate) use fabric::LinkOutage;
use fabric::{cut_link, rejoin, restore_link};

/// SSD record layout (docs/ssd.md): a 64-byte header, then the data, padded to 4 KiB.
const RECORD_MAGIC: &[u8; 8] = b"PFSSDRC1";
const RECORD_HEADER: u64 = 64;
const RECORD_ALIGN: u64 = 4096;

/// Injects fault `index`; faults with a second half schedule it.
pub(crate) async fn start(replay: &mut Replay<'_>, index: usize) {
    let fault = replay.scenario.faults[index].clone();
    let at_ms = fault.at_ms;
    let record = match fault.kind {
        FaultKind::KillNode {
            node,
            restart_after_ms,
        } => {
            kill(replay, node).await;
            replay.push(
                replay.now_us + restart_after_ms * 1000,
                Event::FaultEnd(index),
            );
            return;
        }
        FaultKind::RestartNode { node } => restart(replay, node, at_ms).await,
        FaultKind::RestartEngine { engine } => restart_engine(replay, engine, at_ms).await,
        FaultKind::CorruptSsd { node, pages } => corrupt(replay, node, pages, at_ms).await,
        FaultKind::FillDisk {
            node,
            recover_after_ms,
        } => match fill(replay, node) {
            Ok(()) => {
                replay.push(
                    replay.now_us + recover_after_ms * 1000,
                    Event::FaultEnd(index),
                );
                return;
            }
            Err(why) => FaultRecord {
                at_ms,
                kind: "fill_disk".into(),
                target: format!("node {node}"),
                action: "nothing".into(),
                effect: why,
                recovered: None,
            },
        },
        FaultKind::DropLink { node, duration_ms } => {
            cut_link(replay, index, node, LinkMode::Drop, duration_ms).await;
            return;
        }
        FaultKind::DelayLink {
            node,
            delay_ms,
            duration_ms,
        } => {
            let mode = LinkMode::Delay(Duration::from_millis(delay_ms));
            cut_link(replay, index, node, mode, duration_ms).await;
            return;
        }
    };
    note(replay, &record);
    replay.faults.push(record);
}

/// The second half of fault `index`: restart a killed node, or free a filled disk.
pub(crate) async fn end(replay: &mut Replay<'_>, index: usize) {
    let fault = replay.scenario.faults[index].clone();
    let record = match fault.kind {
        FaultKind::KillNode {
            node,
            restart_after_ms,
        } => recover_kill(replay, node, fault.at_ms, restart_after_ms).await,
        FaultKind::FillDisk {
            node,
            recover_after_ms,
        } => recover_fill(replay, node, fault.at_ms, recover_after_ms).await,
        FaultKind::DropLink { node, duration_ms } => {
            let action = format!("proxy closed and refused every peer's link connections and discarded gossip into the node for {duration_ms} ms (virtual)");
            restore_link(replay, index, node, "drop_link", action).await
        }
        FaultKind::DelayLink {
            node,
            delay_ms,
            duration_ms,
        } => {
            let action = format!("proxy added {delay_ms} ms to each direction of every peer's links and gossip into the node for {duration_ms} ms (virtual)");
            restore_link(replay, index, node, "delay_link", action).await
        }
        _ => return,
    };
    note(replay, &record);
    replay.faults.push(record);
}

fn note(replay: &Replay<'_>, record: &FaultRecord) {
    replay.progress.note(format!(
        "fault at {} ms: {} {}: {} -> {} [{}]",
        record.at_ms,
        record.kind,
        record.target,
        record.action,
        record.effect,
        match record.recovered {
            Some(true) => "recovered",
            Some(false) => "NOT RECOVERED",
            None => "not applicable",
        }
    ));
}

/// SIGKILL a few milliseconds from now, from another task, while the replay keeps issuing
/// requests: the node dies with operations in flight, as a crash does.
async fn kill(replay: &mut Replay<'_>, node: u32) {
    let proc = &replay.nodes[node as usize];
    replay.kill_snapshots[node as usize] = proc.stats().await.ok();
    let Some(pid) = proc.pid() else {
        return;
    };
    let delay = Duration::from_micros(rand::rng().random_range(0..5_000));
    replay.down[node as usize] = true;
    replay.kills[node as usize] = Some(tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        signal(pid, rustix::process::Signal::KILL);
    }));
}

async fn recover_kill(
    replay: &mut Replay<'_>,
    node: u32,
    at_ms: u64,
    after_ms: u64,
) -> FaultRecord {
    let n = node as usize;
    if let Some(kill) = replay.kills[n].take() {
        let _ = kill.await;
    }
    let last = replay.kill_snapshots[n].take();
    replay.nodes[n].reap(last).await;
    let mut record = FaultRecord::pending(
        at_ms,
        "kill_node",
        format!("node {node}"),
        format!("SIGKILL under load, restart {after_ms} ms (virtual) later"),
    );
    match come_back(replay, node).await {
        Ok(back) => {
            let torn = replay.nodes[n].log_lines("torn").len();
            record.effect = format!(
                "serving again {:.2} s after start{}; {} engines re-registered; {} acknowledged blocks checked after the crash: {} lost, {} corrupt; torn-record log lines: {torn}",
                back.started_s, back.rejoin_note(), back.engines, back.checked, back.lost, back.corrupt
            );
            record.recovered = Some(back.recovered());
        }
        Err(effect) => record.effect = effect,
    }
    record
}

/// What a node showed when it came back after a kill or a restart.
struct Comeback {
    started_s: f64,
    /// With the fabric: seconds until every running peer was a member again, or why not.
    rejoined: Option<Result<f64, String>>,
    engines: u32,
    checked: u64,
    lost: u64,
    corrupt: u64,
}

impl Comeback {
    /// Nothing acknowledged lost or corrupt, the engines found their node again, and the node
    /// is back in the fabric.
    fn recovered(&self) -> bool {
        self.lost == 0
            && self.corrupt == 0
            && self.engines > 0
            && self.rejoined.as_ref().is_none_or(Result::is_ok)
    }

    fn rejoin_note(&self) -> String {
        match &self.rejoined {
            None => String::new(),
            Some(Ok(s)) => format!(", back in the fabric with every running peer {s:.2} s later"),
            Some(Err(why)) => format!(", NOT back in the fabric: {why}"),
        }
    }
}

/// Starts a stopped node again, re-registers its engines and checks every block it acknowledged.
async fn come_back(replay: &mut Replay<'_>, node: u32) -> Result<Comeback, String> {
    let n = node as usize;
    let began = Instant::now();
    replay.nodes[n]
        .start()
        .await
        .map_err(|error| format!("did not restart: {error}"))?;
    let started_s = began.elapsed().as_secs_f64();
    replay.nodes[n].restarts += 1;
    replay.down[n] = false;
    let rejoined = if replay.fabric.is_some() {
        Some(rejoin(replay, node).await)
    } else {
        None
    };
    let engines = replay.reconnect(node).await;
    let (checked, lost, corrupt) = replay.verify_acked(node).await;
    Ok(Comeback {
        started_s,
        rejoined,
        engines,
        checked,
        lost,
        corrupt,
    })
}

/// Graceful SIGTERM and start again: everything acknowledged must still be there.
async fn restart(replay: &mut Replay<'_>, node: u32, at_ms: u64) -> FaultRecord {
    let n = node as usize;
    let mut record = FaultRecord::pending(
        at_ms,
        "restart_node",
        format!("node {node}"),
        "SIGTERM (drain), start again".into(),
    );
    for e in replay.engines_of(node) {
        replay.engine_mut(e).disconnect();
    }
    let _ = replay.nodes[n].stop().await;
    match come_back(replay, node).await {
        Ok(back) => {
            record.effect = format!(
                "{} engines re-registered{}; {} acknowledged blocks checked: {} lost, {} corrupt",
                back.engines,
                back.rejoin_note(),
                back.checked,
                back.lost,
                back.corrupt
            );
            record.recovered = Some(back.recovered());
        }
        Err(effect) => record.effect = effect,
    }
    record
}

/// The engine dies holding a lookup lease on its last prompt and comes back with a fresh
/// region; the node must release what the dead connection held.
async fn restart_engine(replay: &mut Replay<'_>, engine: u32, at_ms: u64) -> FaultRecord {
    let e = engine as usize;
    let node = replay.engine_mut(e).node;
    let keys = replay.last_keys(e);
    let socket = replay.nodes[node as usize].socket.clone();
    let mut record = FaultRecord::pending(
        at_ms,
        "restart_engine",
        format!("engine {engine} (node {node})"),
        "connection dropped while holding a lookup lease; engine re-registers a new region".into(),
    );
    let leased = match replay.engine_mut(e).crash(&keys, &socket).await {
        Ok(leased) => leased,
        Err(error) => {
            record.effect = format!("engine did not come back: {error}");
            return record;
        }
    };
    let began = Instant::now();
    let deadline = began + Duration::from_secs(3);
    loop {
        match replay.nodes[node as usize].stats().await {
            Ok(stats) if stats.pool.leased_bytes == 0 => {
                record.effect = format!(
                    "the dead engine held a lease on {leased} pages; pool.leased_bytes back to 0 after {:.0} ms; engine serving again",
                    began.elapsed().as_secs_f64() * 1e3
                );
                record.recovered = Some(true);
                return record;
            }
            Ok(stats) if Instant::now() > deadline => {
                record.effect = format!(
                    "the dead engine held a lease on {leased} pages; pool.leased_bytes still {} after 3 s",
                    stats.pool.leased_bytes
                );
                return record;
            }
            Err(error) => {
                record.effect = format!("cannot read the node's stats: {error}");
                return record;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One record in a segment file.
struct SsdRecord {
    file: PathBuf,
    offset: u64,
    key: BlockKey,
    len: u64,
}

/// Walks the records of every segment file (headers only; stops at the footer or a torn tail).
fn scan(dir: &Path) -> Vec<SsdRecord> {
    let mut records = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return records;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pfs"))
        .collect();
    files.sort();
    for file in files {
        let Ok(mut handle) = std::fs::File::open(&file) else {
            continue;
        };
        let size = handle.metadata().map(|m| m.len()).unwrap_or(0);
        let mut offset = 0;
        let mut header = [0u8; RECORD_HEADER as usize];
        while offset + RECORD_HEADER <= size {
            if handle.seek(SeekFrom::Start(offset)).is_err()
                || handle.read_exact(&mut header).is_err()
            {
                break;
            }
            if &header[..8] != RECORD_MAGIC {
                break;
            }
            let mut key = [0u8; 32];
            key.copy_from_slice(&header[8..40]);
            let mut len = [0u8; 8];
            len.copy_from_slice(&header[40..48]);
            let len = u64::from_le_bytes(len);
            records.push(SsdRecord {
                file: file.clone(),
                offset,
                key,
                len,
            });
            offset += (RECORD_HEADER + len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN;
        }
    }
    records
}

/// Flips one data byte in `pages` records, preferring blocks held on SSD only (so the next
/// load must read the corrupt record), then loads each: the node must refuse it (a miss),
/// never serve the flipped byte.
async fn corrupt(replay: &mut Replay<'_>, node: u32, pages: u32, at_ms: u64) -> FaultRecord {
    let mut record = FaultRecord {
        at_ms,
        kind: "corrupt_ssd".into(),
        target: format!("node {node}"),
        action: String::new(),
        effect: String::new(),
        recovered: None,
    };
    let Some(dir) = replay.nodes[node as usize].ssd_dir.clone() else {
        record.effect = "node has no SSD tier".into();
        return record;
    };
    let Some(engine) = replay
        .engines_of(node)
        .into_iter()
        .find(|&e| replay.engine_mut(e).is_connected())
    else {
        record.effect = "no engine of the node is connected to probe it".into();
        return record;
    };
    let records = scan(&dir);
    let mut rng = rand::rngs::StdRng::seed_from_u64(at_ms ^ u64::from(node));
    let mut chosen = Vec::new();
    let mut fallback = Vec::new();
    let start = if records.is_empty() {
        0
    } else {
        rng.random_range(0..records.len())
    };
    for i in 0..records.len() {
        if chosen.len() >= pages as usize {
            break;
        }
        let candidate = &records[(start + i) % records.len()];
        match replay.engine_mut(engine).holds(&candidate.key).await {
            Ok(Some(true)) => chosen.push((start + i) % records.len()),
            Ok(Some(false)) if fallback.len() < pages as usize => {
                fallback.push((start + i) % records.len())
            }
            _ => {}
        }
    }
    let ssd_only = chosen.len();
    chosen.extend(
        fallback
            .into_iter()
            .take(pages as usize - chosen.len().min(pages as usize)),
    );
    if chosen.is_empty() {
        record.action = format!(
            "found {} records on SSD, none held by the node",
            records.len()
        );
        record.effect = "nothing to corrupt yet; schedule the fault later".into();
        return record;
    }
    let before = replay.nodes[node as usize]
        .stats()
        .await
        .ok()
        .and_then(|s| s.ssd.map(|s| s.checksum_failures))
        .unwrap_or(0);
    let mut flipped = Vec::new();
    for &i in &chosen {
        let r = &records[i];
        let at = r.offset + RECORD_HEADER + r.len / 2;
        if flip_byte(&r.file, at).is_ok() {
            replay.corrupted.insert(r.key);
            flipped.push((r.key, r.file.clone(), at));
        }
    }
    let (mut refused, mut intact, mut served_corrupt) = (0, 0, 0);
    for (key, _, _) in &flipped {
        match replay
            .engine_mut(engine)
            .load_and_check(std::slice::from_ref(key))
            .await
        {
            Ok(good) if good.is_empty() => refused += 1,
            Ok(good) if good[0] => intact += 1,
            Ok(_) => served_corrupt += 1,
            Err(_) => {}
        }
    }
    replay.checks.corrupt_loads += served_corrupt;
    let after = replay.nodes[node as usize]
        .stats()
        .await
        .ok()
        .and_then(|s| s.ssd.map(|s| s.checksum_failures))
        .unwrap_or(0);
    record.action = format!(
        "flipped one data byte in {} of {} records ({ssd_only} held on SSD only), e.g. {}",
        flipped.len(),
        records.len(),
        flipped
            .first()
            .map(|(_, file, at)| format!(
                "{} offset {at}",
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
            .unwrap_or_default()
    );
    record.effect = format!(
        "probe loads: {refused} refused by checksum (miss), {intact} served intact from memory, {served_corrupt} served corrupt; node checksum_failures +{}",
        after.saturating_sub(before)
    );
    record.recovered = Some(served_corrupt == 0 && refused + intact == flipped.len() as u64);
    record
}

fn flip_byte(file: &Path, at: u64) -> std::io::Result<()> {
    let mut handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let mut byte = [0u8; 1];
    handle.seek(SeekFrom::Start(at))?;
    handle.read_exact(&mut byte)?;
    byte[0] ^= 0x5a;
    handle.seek(SeekFrom::Start(at))?;
    handle.write_all(&byte)?;
    handle.sync_all()
}

const BALLAST: &str = "ballast";

/// Fills the node's SSD filesystem (a tmpfs the harness mounted) until ENOSPC.
fn fill(replay: &mut Replay<'_>, node: u32) -> Result<(), String> {
    let proc = &replay.nodes[node as usize];
    let Some(dir) = proc.fill_dir.clone() else {
        return Err(format!(
            "skipped: the SSD directory is not on a filesystem the harness may fill ({})",
            proc.tmpfs_error
                .clone()
                .unwrap_or_else(|| "no tmpfs".into())
        ));
    };
    let mut file = std::fs::File::create(dir.join(BALLAST))
        .map_err(|e| format!("cannot create ballast: {e}"))?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "ballast write failed before the disk was full: {e}"
                ))
            }
        }
    }
}

/// `ENOSPC` on Linux.
fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// Frees the filled disk and restarts the node (the tier stays read-only after a write error
/// until a restart, docs/ssd.md), then checks it is healthy and lost nothing acknowledged.
async fn recover_fill(
    replay: &mut Replay<'_>,
    node: u32,
    at_ms: u64,
    after_ms: u64,
) -> FaultRecord {
    let n = node as usize;
    let mut record = FaultRecord::pending(at_ms, "fill_disk", format!("node {node}"), format!("filled its SSD tmpfs to ENOSPC; freed {after_ms} ms (virtual) later and restarted the node"));
    let during = replay.nodes[n].stats().await.ok().and_then(|s| s.ssd);
    if let Some(dir) = replay.nodes[n].fill_dir.clone() {
        let _ = std::fs::remove_file(dir.join(BALLAST));
    }
    for e in replay.engines_of(node) {
        replay.engine_mut(e).disconnect();
    }
    let _ = replay.nodes[n].stop().await;
    if let Err(error) = replay.nodes[n].start().await {
        record.effect = format!("did not restart: {error}");
        return record;
    }
    replay.nodes[n].restarts += 1;
    replay.reconnect(node).await;
    // The tier reports healthy once its writer is up; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let ssd = replay.nodes[n].stats().await.ok().and_then(|s| s.ssd);
        if ssd.as_ref().is_some_and(|s| s.healthy) || Instant::now() > deadline {
            break ssd;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (checked, lost, corrupt) = replay.verify_acked(node).await;
    let full_lines = replay.nodes[n].log_lines("ENOSPC").len();
    let healthy_after = after.as_ref().is_some_and(|s| s.healthy);
    record.effect = format!(
        "while full: healthy={}, write_errors={}, ENOSPC log lines={full_lines}; after restart: healthy={healthy_after}; {checked} acknowledged blocks checked: {lost} lost, {corrupt} corrupt",
        during.as_ref().map(|s| s.healthy.to_string()).unwrap_or_else(|| "?".into()),
        during.as_ref().map(|s| s.write_errors).unwrap_or(0),
    );
    record.recovered = Some(healthy_after && lost == 0 && corrupt == 0);
    record
}
