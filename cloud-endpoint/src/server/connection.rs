//! One edge connection, one migration: the sans-I/O [`ReceiverSession`]
//! connected to the control stream, the data streams, the datastore and the
//! inventory.
//!
//! Tasks per connection: the control reader (feeds the session), the control
//! writer (drains it), an event task (authentication, plan checks, commit:
//! everything slow and blocking), a sync task (makes written chunks durable,
//! journals them, and only then lets the session acknowledge them), and one
//! task per data stream (admit, read, verify and write chunks on the blocking
//! pool). Whatever ends the connection, one cleanup at the end either keeps the
//! staged files for a resume (the link or a process went away) or discards
//! them (refused, aborted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::chunk::Opener;
use gateway::protocol::{Admission, ReceiverConfig, ReceiverEvent, ReceiverSession, Unsynced};
use gateway::transport::{self, ControlReader, ControlWriter, DataReader, TransportError};
use gateway::wire::{EdgeMessage, RefusalCode};
use tokio::sync::Notify;
use tracing::Instrument;

use super::dedup;
use super::placement::{self, Staged};
use crate::cluster::ownership::Claimed;
use crate::inventory::Principal;
use crate::Domain;

struct Ctx {
    domain: Arc<Domain>,
    conn: quinn::Connection,
    session: Mutex<ReceiverSession>,
    wake_writer: Notify,
    wake_events: Notify,
    /// A held seal waits for written chunks to be made durable (see the sync task).
    sync_now: Notify,
    /// Set once the plan is accepted; taken by commit or discard.
    staged: Mutex<Option<Staged>>,
    /// Held (shared) by every blocking domain operation; the cleanup takes it
    /// exclusively, so it runs only once they are done.
    blocking: Arc<tokio::sync::RwLock<()>>,
    /// Disk files for the data tasks (cheap clones of the staged handles).
    disks: Mutex<Vec<Arc<crate::datastore::DiskFile>>>,
    principal: Mutex<Option<Principal>>,
    edge: String,
    /// SHA-256 thumbprint of the edge's certificate: only it may resume the migration.
    edge_cert: String,
    /// Set when the migration is aborted through the API.
    aborted: Arc<AtomicBool>,
    /// The migration this connection serves, once accepted or resumed.
    migration_id: Mutex<Option<String>>,
    /// The seed the plan named (`edge-agent replicate --seed`), once checked and indexed.
    seed: Mutex<Option<Arc<super::seed::Seed>>>,
    /// Bandwidth caps: the endpoint's total and this migration's.
    caps: Vec<Arc<gateway::transport::RateLimit>>,
    /// The endpoint's migration slots, and the one this migration holds once its plan
    /// arrived (released when the connection's context is dropped).
    slots: Arc<tokio::sync::Semaphore>,
    slot: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// When the connection came: a replication pass is timed from here (the forecast).
    connected: Instant,
    /// When the edge's `SyncDone` or commit arrived (the first read-back started).
    verify_started: Mutex<Option<Instant>>,
    /// The connection's span: its `migration_id` is recorded once known, so that every
    /// line of the migration carries it.
    span: tracing::Span,
    /// UDP bytes received as last counted into the metrics.
    wire_counted: std::sync::atomic::AtomicU64,
    /// Set when this endpoint lost the migration's lease: another endpoint may own the
    /// staging folder now, so this connection leaves it alone.
    lease_lost: Arc<AtomicBool>,
}

impl Ctx {
    /// The plan was accepted or resumed: the context holds its staged files and
    /// the endpoint knows this connection serves it.
    fn attach(&self, staged: Staged) {
        let id = staged.migration_id.clone();
        *self.disks.lock().expect("disks lock") = staged.disks.clone();
        *self.staged.lock().expect("staged lock") = Some(staged);
        self.domain.live.attach(&id, &self.conn, self.aborted.clone());
        self.span.record("migration_id", tracing::field::display(&id));
        *self.migration_id.lock().expect("id lock") = Some(id);
    }

    /// Counts the UDP bytes received since the last call into the metrics.
    fn count_wire_bytes(&self) {
        let now = self.conn.stats().udp_rx.bytes;
        let before = self.wire_counted.swap(now, Ordering::Relaxed);
        self.domain
            .metrics
            .received_wire_bytes
            .inc_by(now.saturating_sub(before));
    }

    /// The datastore of `disk` (the VM's for `None`) as placed, for messages: the
    /// default datastore before a plan is staged.
    fn datastore_name(&self, disk: Option<u16>) -> String {
        let staged = self.staged.lock().expect("staged lock");
        match staged.as_ref() {
            Some(s) => disk
                .and_then(|d| s.placement.disk_datastores.get(usize::from(d)))
                .unwrap_or(&s.placement.datastore)
                .name
                .clone(),
            None => self.domain.datastore.name().to_owned(),
        }
    }

    fn session(&self) -> std::sync::MutexGuard<'_, ReceiverSession> {
        self.session.lock().expect("session lock poisoned")
    }

    /// After any change to the session: let the writer and the event task look.
    fn wake(&self) {
        self.wake_writer.notify_one();
        self.wake_events.notify_one();
    }
}

/// Serves one accepted connection to its end.
/// `control_streams` is the control stream, its preamble already read by the dispatch;
/// `connected` is when the handshake completed (the session's deadlines count from it).
pub async fn serve(
    connected: Instant,
    conn: quinn::Connection,
    domain: Arc<Domain>,
    config: ReceiverConfig,
    caps: super::Caps,
    control_streams: (quinn::SendStream, quinn::RecvStream),
    slots: Arc<tokio::sync::Semaphore>,
) {
    let peer = conn.remote_address();
    let edge = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| certs::Thumbprint::of_der(c).to_string()))
        .unwrap_or_default();
    let span = tracing::info_span!("edge", %peer, migration_id = tracing::field::Empty);
    async move {
        tracing::info!(edge_cert = ?edge, "edge connected");
        let ctx = Arc::new(Ctx {
            domain,
            conn: conn.clone(),
            session: Mutex::new(ReceiverSession::new(config, connected)),
            wake_writer: Notify::new(),
            wake_events: Notify::new(),
            sync_now: Notify::new(),
            staged: Mutex::new(None),
            blocking: Arc::new(tokio::sync::RwLock::new(())),
            disks: Mutex::new(Vec::new()),
            principal: Mutex::new(None),
            edge: format!("{peer} cert {edge}"),
            edge_cert: edge.clone(),
            aborted: super::live::abort_flag(),
            migration_id: Mutex::new(None),
            seed: Mutex::new(None),
            caps: caps
                .total
                .into_iter()
                .chain(
                    caps.per_migration
                        .map(|r| Arc::new(gateway::transport::RateLimit::with_burst(r, super::READ_BURST))),
                )
                .collect(),
            slots,
            slot: Mutex::new(None),
            connected,
            verify_started: Mutex::new(None),
            span: tracing::Span::current(),
            wire_counted: Default::default(),
            lease_lost: Default::default(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(events(ctx.clone()).in_current_span());
        tasks.spawn(control(ctx.clone(), control_streams).in_current_span());
        tasks.spawn(accept_data(ctx.clone()).in_current_span());
        tasks.spawn(sync(ctx.clone()).in_current_span());
        let reason = conn.closed().await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        cleanup(&ctx, &reason).await;
    }
    .instrument(span)
    .await
}

/// Ends the connection's migration: nothing to do if it committed; its files
/// are kept for a resume if the connection just went away (or the migration
/// paused); they are discarded if it was refused or aborted.
async fn cleanup(ctx: &Arc<Ctx>, reason: &quinn::ConnectionError) {
    // Wait for blocking work the aborted tasks started (staging a plan,
    // committing, syncing): it finishes on its own and may still record staged files.
    let _quiet = ctx.blocking.write().await;
    let (committed, synced, resumable, unsynced) = {
        let mut s = ctx.session();
        (s.is_committed(), s.is_synced(), s.is_resumable(), s.take_unsynced())
    };
    let staged = ctx.staged.lock().expect("staged lock").take();
    let id = ctx.migration_id.lock().expect("id lock").clone();
    ctx.count_wire_bytes();
    let detach = || {
        if let Some(id) = &id {
            ctx.domain.metrics.migration_ended(id);
            ctx.domain.links.end(id);
            ctx.domain.live.detach(id, &ctx.conn);
            if committed || !resumable {
                ctx.domain.live.forget_progress(id);
            }
        }
    };
    if committed {
        tracing::info!("migration committed, connection closed");
        return detach();
    }
    if ctx.lease_lost.load(Ordering::SeqCst) {
        tracing::warn!(
            "this endpoint lost the migration's lease: its staged files are left to the endpoint that owns it now"
        );
        return detach();
    }
    let why = match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!("connection closed: {}", String::from_utf8_lossy(&c.reason))
        }
        quinn::ConnectionError::LocallyClosed => "closed by the endpoint".to_owned(),
        other => format!("connection lost: {other}"),
    };
    // Aborted through the API, or by the edge giving up for good (it closes
    // with Aborted; a pause it means to resume closes with Paused).
    let edge_gave_up = matches!(reason, quinn::ConnectionError::ApplicationClosed(c)
        if RefusalCode::from_close_code(c.error_code.into_inner()) == Some(RefusalCode::Aborted));
    let aborted = ctx.aborted.load(Ordering::SeqCst) || edge_gave_up;
    if let Some(staged) = staged {
        let domain = ctx.domain.clone();
        if resumable && !aborted {
            if let Some(id) = &id {
                ctx.domain.live.set_progress(id, ctx.session().durable_bytes());
            }
            // A replication's pass that ended in sync is kept, as it should be: not a warning.
            if synced {
                tracing::info!(reason = ?why, "pass in sync, replica kept; connection closed");
            } else {
                tracing::warn!(reason = ?why, "migration not committed; kept for a resume");
            }
            let _ = spawn_blocking_in_span(move || placement::suspend(&domain, staged, &unsynced, &why)).await;
        } else {
            let why = if ctx.aborted.load(Ordering::SeqCst) {
                "aborted through the API".to_owned()
            } else {
                why
            };
            tracing::warn!(reason = ?why, "migration not committed; discarding");
            let _ = spawn_blocking_in_span(move || placement::discard(&domain, staged, &why)).await;
        }
    }
    detach();
}

/// How often written chunks are made durable and acknowledged. Longer batches
/// cost fewer fsyncs; shorter ones leave less to re-send after a break.
const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// Written chunks are made durable as soon as nothing more arrived for this long: a
/// pause in a sparse delta is acknowledged without waiting for the next
/// [`SYNC_INTERVAL`]. The end of a pass does not wait even that long: the edge's seal
/// counts its frames, and the last one written wakes the sync at once.
const SYNC_QUIET: Duration = Duration::from_millis(20);

/// Makes written chunks durable, journals them, then acknowledges them.
async fn sync(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(SYNC_QUIET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rate = Rate::default();
    let mut last = Instant::now();
    let mut waiting = 0;
    loop {
        // A seal waits for its last chunks to be durable: sync them now, not after the
        // quiet interval (the end of a delta pass is mostly that wait).
        let sealing = tokio::select! {
            _ = tick.tick() => false,
            _ = ctx.sync_now.notified() => true,
        };
        // Every SYNC_INTERVAL while data flows; sooner once it stopped.
        let due = sealing || last.elapsed() >= SYNC_INTERVAL;
        let pending = ctx.session().unsynced_len();
        let quiet = pending > 0 && pending == waiting;
        waiting = pending;
        if !due && !quiet {
            continue;
        }
        last = Instant::now();
        waiting = 0;
        ctx.count_wire_bytes();
        sample(&ctx, &mut rate);
        // The cleanup waits for this (it takes `blocking` exclusively): a batch
        // taken from the session is always journaled or handed back.
        let guard = ctx.blocking.clone().read_owned().await;
        let (batch, durable) = {
            let mut s = ctx.session();
            (s.take_unsynced(), s.durable_bytes())
        };
        if let Some(id) = ctx.migration_id.lock().expect("id lock").as_deref() {
            ctx.domain.live.set_progress(id, durable);
        }
        if batch.is_empty() {
            continue;
        }
        let Some(journal) = ctx
            .staged
            .lock()
            .expect("staged lock")
            .as_ref()
            .map(|s| s.journal.clone())
        else {
            continue;
        };
        let disks = ctx.disks.lock().expect("disks lock").clone();
        let (batch, result) = spawn_blocking_in_span(move || {
            let _guard = guard;
            let result = sync_batch(&disks, &journal, &batch);
            (batch, result)
        })
        .await
        .expect("syncing does not panic");
        match result {
            Ok(()) => ctx.session().synced(&batch),
            Err(e) => {
                tracing::error!(error = %e, "cannot make chunks durable");
                ctx.session().pause(vec![format!(
                    "the endpoint cannot make written data durable in datastore {}: {e}; what arrived is kept: fix the datastore, then run the same migration again to resume",
                    ctx.datastore_name(None)
                )]);
            }
        }
        ctx.wake();
    }
}

/// A migration's rate: logical bytes made durable per second, smoothed over a few seconds.
#[derive(Default)]
struct Rate {
    last: Option<(Instant, u64)>,
    per_second: f64,
}

/// How much of the rate each new second of samples makes (an exponential moving
/// average over about five seconds).
const RATE_WEIGHT_PER_SECOND: f64 = 0.2;

/// The migration's progress, rate, ETA and link into the metrics.
fn sample(ctx: &Ctx, rate: &mut Rate) {
    let Some(id) = ctx.migration_id.lock().expect("id lock").clone() else {
        return;
    };
    let (durable, total) = {
        let s = ctx.session();
        (s.durable_bytes(), s.plan().map_or(0, |p| p.logical_bytes()))
    };
    let now = Instant::now();
    if let Some((then, bytes)) = rate.last {
        let secs = now.duration_since(then).as_secs_f64();
        if secs > 0.0 {
            let current = durable.saturating_sub(bytes) as f64 / secs;
            let weight = (RATE_WEIGHT_PER_SECOND * secs).min(1.0);
            rate.per_second += (current - rate.per_second) * weight;
        }
    }
    rate.last = Some((now, durable));
    let stats = ctx.conn.stats();
    let sample = crate::metrics::MigrationSample {
        durable_bytes: durable,
        total_bytes: total,
        rate: rate.per_second,
        rtt: ctx.conn.rtt(),
        lost_packets: stats.path.lost_packets,
        sent_packets: stats.path.sent_packets,
        cwnd: stats.path.cwnd,
    };
    ctx.domain.metrics.migration_sample(&id, &sample);
    ctx.domain.links.record(
        &id,
        &ctx.edge,
        crate::server::links::LinkSample {
            at_ms: crate::server::links::epoch_ms(std::time::SystemTime::now()),
            durable_bytes: durable,
            total_bytes: total,
            rate_bytes_per_second: sample.rate,
            eta_seconds: sample.eta_seconds(),
            rtt_ms: sample.rtt.as_secs_f64() * 1000.0,
            sent_packets: sample.sent_packets,
            lost_packets: sample.lost_packets,
            cwnd_bytes: sample.cwnd,
        },
    );
}

/// fdatasync of the disks a batch wrote, then the journal records it.
fn sync_batch(
    disks: &[Arc<crate::datastore::DiskFile>],
    journal: &crate::datastore::Journal,
    batch: &Unsynced,
) -> std::io::Result<()> {
    let mut touched: Vec<u16> = batch.chunks.iter().map(|c| c.0).collect();
    touched.sort_unstable();
    touched.dedup();
    for d in touched {
        if let Some(disk) = disks.get(usize::from(d)) {
            disk.sync_data()?;
        }
    }
    journal.append(batch)
}

/// `tokio::task::spawn_blocking` in the current span: the lines of the blocking work
/// (staging, journaling, commit, discard) carry the connection's peer and migration id too.
fn spawn_blocking_in_span<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
}

/// Closes the connection with the session's refusal once it is sent.
fn close_refused(ctx: &Ctx, code: RefusalCode, reason: &str) {
    transport::close(&ctx.conn, code, reason);
}

const ENDED_EARLY: &str = "the edge ended its control stream before the migration ended";

async fn control(ctx: Arc<Ctx>, (send, recv): (quinn::SendStream, quinn::RecvStream)) {
    // The dispatch (server::probe::first_stream) accepted the stream, with its
    // timeout, and checked the preamble.
    let reader = ControlReader::open(recv, false)
        .await
        .expect("no I/O without a preamble");
    let writer = ControlWriter::open(send, false)
        .await
        .expect("no I/O without a preamble");
    let read = control_reader(&ctx, reader);
    let write = control_writer(&ctx, writer);
    tokio::pin!(read, write);
    tokio::select! {
        e = &mut read => {
            // The edge finished its control stream with the migration still open (it
            // never does without an Abort first): nothing more can come, and without a
            // close the connection stayed open as long as the edge sent keep-alives.
            // It is closed at once; an accepted migration stays resumable, as for any
            // edge that went away (a process whose streams were dropped ends them so).
            let ended_early = e.is_ok() && !ctx.session().is_finished();
            if ended_early {
                close_refused(&ctx, RefusalCode::ProtocolViolation, ENDED_EARLY);
                return;
            }
            if let Err(e) = e {
                if !ctx.session().is_finished() {
                    close_refused(&ctx, RefusalCode::ProtocolViolation, &e.to_string());
                }
            }
            // Let the writer flush the final answer.
            let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        }
        _ = &mut write => {}
    }
}

async fn control_reader(ctx: &Ctx, mut reader: ControlReader) -> Result<(), TransportError> {
    loop {
        let deadline = ctx.session().poll_timeout();
        let msg = match deadline {
            Some(deadline) => tokio::select! {
                m = reader.recv::<EdgeMessage>() => m?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    ctx.session().handle_timeout(Instant::now());
                    ctx.wake();
                    continue;
                }
            },
            None => reader.recv::<EdgeMessage>().await?,
        };
        let Some(msg) = msg else {
            return Ok(());
        };
        let res = ctx.session().handle_control(msg, Instant::now());
        ctx.wake();
        if let Err(e) = res {
            tracing::warn!(error = %e, "edge violated the protocol");
        }
    }
}

async fn control_writer(ctx: &Ctx, mut writer: ControlWriter) {
    loop {
        let (msgs, finished, committed) = {
            let mut s = ctx.session();
            let msgs: Vec<_> = std::iter::from_fn(|| s.poll_transmit()).collect();
            (msgs, s.is_finished(), s.is_committed())
        };
        for msg in &msgs {
            if let gateway::wire::CloudMessage::Refused { code, .. } = msg {
                ctx.domain.metrics.refused(*code);
            }
            if writer.send(msg).await.is_err() {
                // The edge stopped reading its control stream (or the connection is gone):
                // nothing more can reach it, and without a close a peer that sends
                // keep-alives held the connection past every deadline.
                let (code, reason) = last_refusal(&msgs).unwrap_or((
                    RefusalCode::ProtocolViolation,
                    "the edge stopped reading its control stream".to_owned(),
                ));
                close_refused(ctx, code, &reason);
                return;
            }
        }
        if finished {
            writer.finish();
            // The edge closes once it has read the answer; if it does not,
            // close after a grace period so the connection does not linger.
            if tokio::time::timeout(Duration::from_secs(5), ctx.conn.closed())
                .await
                .is_err()
            {
                let (code, reason) = match last_refusal(&msgs) {
                    Some(refusal) => refusal,
                    None if committed => (RefusalCode::Aborted, "committed".to_owned()),
                    None => (RefusalCode::Aborted, "migration ended".to_owned()),
                };
                if committed {
                    ctx.conn.close(0u32.into(), b"committed");
                } else {
                    close_refused(ctx, code, &reason);
                }
            }
            return;
        }
        ctx.wake_writer.notified().await;
    }
}

/// The last refusal among `msgs`: its code and problems, for a close.
fn last_refusal(msgs: &[gateway::wire::CloudMessage]) -> Option<(RefusalCode, String)> {
    msgs.iter().rev().find_map(|m| match m {
        gateway::wire::CloudMessage::Refused { code, problems } => Some((*code, problems.join("; "))),
        _ => None,
    })
}

/// Authentication, plan checks, commit and discard: the session's requests.
async fn events(ctx: Arc<Ctx>) {
    loop {
        let events: Vec<_> = {
            let mut s = ctx.session();
            std::iter::from_fn(|| s.poll_event()).collect()
        };
        for event in events {
            handle_event(&ctx, event).await;
            ctx.wake();
        }
        ctx.wake_events.notified().await;
    }
}

/// A slot per migration bounds memory and disk bandwidth; an edge over the limit is
/// told to retry rather than queued invisibly. Taken once a credential and a plan (or a
/// resume) arrived, not at the first stream: a flood of connections that never send
/// them would otherwise hold every slot until their setup timeout, and real migrations
/// would be refused as busy. False (and the session refused) when none is free.
fn take_slot(ctx: &Ctx) -> bool {
    let Ok(slot) = ctx.slots.clone().try_acquire_owned() else {
        tracing::warn!("refused: too many concurrent migrations");
        ctx.session().refuse(
            RefusalCode::Busy,
            vec!["the cloud endpoint is at its limit of concurrent migrations; retry later".into()],
        );
        return false;
    };
    *ctx.slot.lock().expect("slot lock") = Some(slot);
    true
}

/// A replication that switches over or is aborted: its test boot, a copy of what is now
/// the VM (or of nothing), is discarded, in the background.
fn discard_test_boot(ctx: &Ctx, migration_id: &str) {
    let (domain, id) = (ctx.domain.clone(), migration_id.to_owned());
    tokio::spawn(async move {
        match domain.hosts.discard_test_boot(&id).await {
            Ok(true) => tracing::info!(migration = ?id, "its test boot was discarded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(migration = ?id, error = %e, "cannot discard its test boot"),
        }
    });
}

/// Who the edge authenticated as; refuses the session (a `what` before any
/// credential is a protocol violation) when nobody.
fn authenticated(ctx: &Ctx, what: &str) -> Option<Principal> {
    let principal = ctx.principal.lock().expect("principal lock").clone();
    if principal.is_none() {
        ctx.session().refuse(
            RefusalCode::ProtocolViolation,
            vec![format!("{what} before authentication")],
        );
    }
    principal
}

async fn handle_event(ctx: &Arc<Ctx>, event: ReceiverEvent) {
    let domain = ctx.domain.clone();
    match event {
        ReceiverEvent::Authenticate { agent, user, password } => {
            let source = ctx.conn.remote_address().ip();
            let check = domain.clone();
            let result = domain
                .logins
                .login(source, "QUIC", move || {
                    check
                        .logins
                        .authenticate(&check.inventory, &user, &password, source, "QUIC")
                })
                .await;
            let answer = match result {
                Ok(p) => {
                    tracing::info!(user = ?p.user, role = %p.role.as_str(), ?agent, "authenticated");
                    let role = p.role.as_str().to_owned();
                    *ctx.principal.lock().expect("principal lock") = Some(p);
                    Ok(role)
                }
                // The login gate logged the failure or refusal.
                Err(e) => Err(crate::logins::refusal(&e)),
            };
            ctx.session().authenticated(answer, &ctx.domain.endpoint_name);
        }
        ReceiverEvent::ValidatePlan(plan) => {
            let Some(principal) = authenticated(ctx, "plan") else {
                return;
            };
            if !take_slot(ctx) {
                return;
            }
            let (edge, edge_cert) = (ctx.edge.clone(), ctx.edge_cert.clone());
            // The staged files are recorded in the context by the blocking task
            // itself: if the connection drops meanwhile and this task is
            // aborted, the cleanup still finds (and removes) them.
            let guard = ctx.blocking.clone().read_owned().await;
            let record = ctx.clone();
            let result = spawn_blocking_in_span(move || {
                let _guard = guard;
                let seed = prepare_seed(&domain, &principal, &edge_cert, &plan, &record.conn)?;
                let staged = placement::validate_and_stage(&domain, &principal, &edge, &edge_cert, &plan)?;
                let id = staged.migration_id.clone();
                if let Some(lease) = &staged.lease {
                    lease.when_lost(stop_when_lost(&record));
                }
                record.attach(staged);
                *record.seed.lock().expect("seed lock") = seed;
                Ok(id)
            })
            .await
            .expect("validation does not panic");
            match result {
                Ok(id) => {
                    tracing::info!(migration = %id, "plan accepted");
                    let ds = ctx.datastore_name(None);
                    // Data streams only now: until the plan is accepted, a stream the
                    // peer may open is memory it can fill without being read.
                    transport::allow_streams(&ctx.conn, transport::StreamPhase::Data);
                    // A commit or pass that answered its edge may still be indexing.
                    let _indexed = ctx.domain.indexing.read().await;
                    let dedup = requester(ctx).is_some_and(|who| dedup::offered(&ctx.domain, &who));
                    ctx.session().plan_accepted(id, ds, dedup);
                }
                Err((code, problems)) => {
                    tracing::warn!(?code, ?problems, "plan refused");
                    ctx.session().refuse(code, problems);
                }
            }
        }
        // `edge-agent plan`: the checks of a migration, nothing staged or recorded, and
        // no migration slot taken (a check holds nothing for long).
        ReceiverEvent::CheckPlan(plan) => {
            let Some(principal) = authenticated(ctx, "plan") else {
                return;
            };
            let guard = ctx.blocking.clone().read_owned().await;
            let edge_cert = ctx.edge_cert.clone();
            let result = spawn_blocking_in_span(move || {
                let _guard = guard;
                // The seed is checked (found, this tenant's, the same disks), not indexed.
                let seed = super::seed::resolve(&domain, &principal, &edge_cert, &plan).err();
                match (placement::validate(&domain, &principal, &plan), seed) {
                    (Ok(v), None) => Ok(v.preview),
                    (Ok(_), Some(problems)) => Err((RefusalCode::PlanRejected, problems)),
                    (Err((code, mut problems)), seed) => {
                        problems.extend(seed.unwrap_or_default());
                        Err((code, problems))
                    }
                }
            })
            .await
            .expect("validation does not panic");
            match &result {
                Ok(_) => tracing::info!("plan checked: valid"),
                Err((code, problems)) => tracing::info!(?code, ?problems, "plan checked: refused"),
            }
            ctx.session().plan_checked(result);
        }
        ReceiverEvent::ValidateResume {
            migration_id,
            plan,
            switched_over,
        } => {
            let Some(principal) = authenticated(ctx, "resume") else {
                return;
            };
            // An edge that missed its commit's answer gets it now, with nothing staged;
            // not one whose record says it switched over (it got the answer).
            let replay = if switched_over {
                Ok(None)
            } else {
                placement::committed_replay(&domain, &principal, &ctx.edge_cert, &migration_id, &plan)
            };
            match replay {
                Ok(Some(replay)) => {
                    tracing::info!(migration = ?migration_id, vm_id = %replay.registered.vm_id, "resume of a committed migration: replaying its commit");
                    let ds = ctx.datastore_name(None);
                    ctx.session()
                        .resume_committed(migration_id, ds, &replay.roots, replay.registered);
                    return;
                }
                Ok(None) => {}
                Err((code, problems)) => {
                    ctx.session().refuse(code, problems);
                    return;
                }
            }
            // Who asks, from which edge, with which plan: checked before anything
            // touches the migration. A resume refused after the take-over below would
            // have ended the connection of the owner's agent, lifting at that moment.
            let check = {
                let (domain, principal, edge_cert, id, plan) = (
                    domain.clone(),
                    principal.clone(),
                    ctx.edge_cert.clone(),
                    migration_id.clone(),
                    plan.clone(),
                );
                spawn_blocking_in_span(move || {
                    placement::check_resume(&domain, &principal, &edge_cert, &id, &plan).map(|_| ())
                })
                .await
                .expect("checking a resume does not panic")
            };
            if let Err((code, problems)) = check {
                tracing::warn!(migration = ?migration_id, ?code, ?problems, "resume refused");
                ctx.session().refuse(code, problems);
                return;
            }
            // The edge may be back before the endpoint noticed its old
            // connection is gone: close that one and let its cleanup keep the files.
            if !ctx.domain.live.take_over(&migration_id).await {
                ctx.session().refuse(
                    RefusalCode::Busy,
                    vec![format!(
                        "migration {migration_id} is still being closed on its previous connection; retry in a few seconds"
                    )],
                );
                return;
            }
            if !ctx.domain.live.claim(&migration_id, &ctx.conn, ctx.aborted.clone()) {
                ctx.session().refuse(
                    RefusalCode::Busy,
                    vec![format!(
                        "the replica of migration {migration_id} is being copied for a test boot; retry in a few seconds"
                    )],
                );
                return;
            }
            if !take_slot(ctx) {
                ctx.domain.live.detach(&migration_id, &ctx.conn);
                return;
            }
            let edge_cert = ctx.edge_cert.clone();
            let guard = ctx.blocking.clone().read_owned().await;
            let record = ctx.clone();
            let id = migration_id.clone();
            let result = spawn_blocking_in_span(move || {
                let _guard = guard;
                // One owner at a time: an endpoint of the domain that still holds the
                // lease serves it (or died, and the lease runs out first).
                let owner = &domain.ownership;
                let lease = match owner.claim(&domain.inventory, &id, stop_when_lost(&record)) {
                    Ok(Claimed::Mine(lease)) => lease,
                    Ok(Claimed::HeldBy(held)) => return Err((RefusalCode::Busy, vec![owner.held_elsewhere(&held)])),
                    Err(e) => return Err(placement::endpoint_failure(e)),
                };
                match placement::resume(&domain, &principal, &edge_cert, &id, &plan) {
                    Ok((mut staged, durable)) => {
                        staged.lease = Some(lease);
                        record.attach(staged);
                        Ok(durable)
                    }
                    Err(refused) => {
                        lease.release(&domain.inventory);
                        Err(refused)
                    }
                }
            })
            .await
            .expect("resume does not panic");
            match result {
                Ok(durable) => {
                    let durable_chunks: u64 = durable.iter().map(|d| d.known()).sum();
                    tracing::info!(migration = ?migration_id, durable_chunks, "migration resumed");
                    ctx.domain.metrics.resumes.inc();
                    let ds = ctx.datastore_name(None);
                    transport::allow_streams(&ctx.conn, transport::StreamPhase::Data);
                    ctx.session().resume_accepted(migration_id, ds, durable);
                }
                Err((code, problems)) => {
                    tracing::warn!(?code, ?problems, "resume refused");
                    ctx.domain.live.detach(&migration_id, &ctx.conn);
                    ctx.session().refuse(code, problems);
                }
            }
        }
        ReceiverEvent::VerifyStaged { chunks } => {
            ctx.verify_started
                .lock()
                .expect("verify lock")
                .get_or_insert_with(Instant::now);
            if ctx.session().switchover().is_some() {
                if let Some(id) = ctx.migration_id.lock().expect("id lock").clone() {
                    ctx.domain.live.set_switching(&id);
                    discard_test_boot(ctx, &id);
                }
            }
            verify_staged(ctx, chunks).await
        }
        // In a task of its own: the pass goes on (hash queries, the commit) while it reads.
        ReceiverEvent::VerifyEarly { chunks } => {
            let ctx = ctx.clone();
            tokio::spawn(
                async move {
                    verify_early(&ctx, chunks).await;
                    ctx.wake();
                }
                .in_current_span(),
            );
        }
        // `edge-agent rollback` or `confirm`: who asks is checked first; a refusal
        // changes nothing.
        ReceiverEvent::EndSwitchover { migration_id, confirm } => {
            let Some(principal) = authenticated(ctx, if confirm { "confirm" } else { "rollback" }) else {
                return;
            };
            let result = placement::end_switchover(&domain, &principal, &ctx.edge_cert, &migration_id, confirm).await;
            match &result {
                Ok(what) => tracing::info!(migration = ?migration_id, confirm, ?what, "switchover ended by its edge"),
                Err((code, problems)) => {
                    tracing::warn!(migration = ?migration_id, ?code, ?problems, confirm, "rollback or confirm refused")
                }
            }
            ctx.session().switchover_ended(result);
        }
        // `edge-agent abort`: who asks is checked first, and a refusal leaves the
        // migration and the connection that serves it alone.
        ReceiverEvent::AbortMigration { migration_id, reason } => {
            let Some(principal) = authenticated(ctx, "abort") else {
                return;
            };
            let edge_cert = ctx.edge_cert.clone();
            let id = migration_id.clone();
            let result = spawn_blocking_in_span(move || {
                placement::authorize(&domain, &principal, &edge_cert, &id, placement::Action::Abort)?;
                // The edge's words go into the record and a close reason: one plain line.
                let reason: String = reason.chars().filter(|c| !c.is_control()).take(200).collect();
                let why = format!("aborted by {} with edge-agent abort: {reason}", principal.user);
                placement::abort(&domain, &id, &why).map_err(placement::endpoint_failure)?;
                Ok(why)
            })
            .await
            .expect("aborting does not panic");
            match result {
                Ok(why) => {
                    tracing::warn!(migration = ?migration_id, ?why, "migration aborted by its edge");
                    discard_test_boot(ctx, &migration_id);
                    ctx.session().migration_aborted(Ok(()));
                    close_refused(ctx, RefusalCode::Aborted, &format!("{migration_id} discarded: {why}"));
                }
                Err((code, problems)) => {
                    tracing::warn!(migration = ?migration_id, ?code, ?problems, "abort refused");
                    ctx.session().migration_aborted(Err((code, problems)));
                }
            }
        }
        ReceiverEvent::Lookup { disk, chunks } => {
            let target = ctx.disks.lock().expect("disks lock").get(usize::from(disk)).cloned();
            let (Some(who), Some(target)) = (requester(ctx), target) else {
                let results = chunks.iter().map(|c| (c.0, false)).collect();
                ctx.session().lookup_done(disk, results);
                return;
            };
            let guard = ctx.blocking.clone().read_owned().await;
            let (results, seeded) = spawn_blocking_in_span(move || {
                let _guard = guard;
                dedup::copy_chunks(&domain, &who, disk, &target, &chunks)
            })
            .await
            .expect("copying chunks does not panic");
            let copied = results.iter().filter(|r| r.1).count();
            tracing::debug!(
                disk,
                asked = results.len(),
                copied,
                seeded = seeded.len(),
                "hash query answered"
            );
            ctx.session().lookup_done_seeded(disk, results, &seeded);
        }
        ReceiverEvent::Finalize => {
            let mut staged = ctx.staged.lock().expect("staged lock").take();
            let lease = staged.as_mut().and_then(|s| s.lease.take());
            let (plan, roots, zero_bytes, hashes, dedup_bytes) = {
                let s = ctx.session();
                let hashes: Vec<gateway::integrity::DiskHashes> =
                    s.disk_hashes().unwrap_or_default().into_iter().cloned().collect();
                (
                    s.plan().cloned(),
                    s.disk_roots(),
                    s.zero_bytes(),
                    hashes,
                    s.dedup_bytes(),
                )
            };
            let (Some(staged), Some(plan), Some(roots)) = (staged, plan, roots) else {
                ctx.session()
                    .finalized(Err((RefusalCode::EndpointFailure, "nothing staged to commit".into())));
                return;
            };
            ctx.disks.lock().expect("disks lock").clear();
            tracing::info!(migration = %staged.migration_id, "every disk verified; flushing and registering");
            let format = staged.format.as_str();
            let migration_id = staged.migration_id.clone();
            let switchover = ctx.session().switchover().cloned();
            // Until it is confirmed a switchover can be rolled back: its folders keep the
            // replica's journal.
            let reversible = switchover.as_ref().is_some_and(|(request, _)| !request.confirm);
            let guard = ctx.blocking.clone().read_owned().await;
            let committing = domain.clone();
            let lost = ctx.lease_lost.clone();
            let result = spawn_blocking_in_span(move || {
                let _guard = guard;
                // An owner that lost the migration must not register it: the endpoint
                // that took it over may be writing its staging folder.
                if let Some(lease) = &lease {
                    if let Err(why) = lease.confirm(&committing.inventory) {
                        lost.store(true, Ordering::SeqCst);
                        return Err((RefusalCode::Busy, why));
                    }
                }
                let registered = placement::finalize(&committing, &plan, staged, &roots, zero_bytes, reversible);
                if let Some(lease) = lease {
                    lease.release(&committing.inventory);
                }
                registered.map_err(|e| (RefusalCode::EndpointFailure, e))
            })
            .await
            .expect("finalize does not panic");
            match &result {
                Ok(r) => tracing::info!(vm_id = %r.vm_id, path = ?r.vm_path, format, "VM registered, receipt signed"),
                Err((_, e)) => tracing::error!(error = %e, "commit failed"),
            }
            let indexing = match (&result, requester(ctx)) {
                // Taken before the answer: a plan accepted after it waits for the index.
                (Ok(registered), Some(who)) => Some((
                    registered.vm_id.clone(),
                    who,
                    domain.indexing.clone().write_owned().await,
                )),
                _ => None,
            };
            if let (Ok(registered), Some((request, received))) = (&result, switchover) {
                let outcome =
                    placement::switched_over(&domain, &migration_id, &registered.vm_id, &request, received).await;
                ctx.session().switched_over(outcome);
            }
            ctx.session().finalized(result);
            if let Some((vm_id, who, indexing)) = indexing {
                // Later migrations of this user or edge may copy this VM's chunks. After
                // the answer: the index is for them, and on a 10 GiB disk it is 160,000
                // rows the edge (and a switchover's downtime) would wait for.
                ctx.wake();
                let _ = spawn_blocking_in_span(move || {
                    let _indexing = indexing;
                    if dedup_bytes > 0 {
                        let _ = domain.inventory.add_dedup_bytes(&who.migration, dedup_bytes);
                    }
                    dedup::index_committed(&domain, &who, &vm_id, &hashes);
                })
                .await;
            }
        }
        // A replication pass ended and was read back: the staging stays as the replica.
        ReceiverEvent::KeepReplica { delta_bytes, schedule } => {
            let unsynced = ctx.session().take_unsynced();
            let record = ctx.clone();
            let guard = ctx.blocking.clone().read_owned().await;
            let batch = unsynced.clone();
            let now = Instant::now();
            let verify_started = ctx.verify_started.lock().expect("verify lock").unwrap_or(now);
            let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            let pass = crate::inventory::PassTimes {
                pass_ms: millis(verify_started.saturating_duration_since(ctx.connected)),
                read_back_ms: millis(now.saturating_duration_since(verify_started)),
            };
            let who = requester(ctx);
            let (hashes, dedup_bytes, window) = {
                let s = ctx.session();
                let hashes: Vec<gateway::integrity::DiskHashes> =
                    s.disk_hashes().unwrap_or_default().into_iter().cloned().collect();
                (hashes, s.dedup_bytes(), s.window_schedule())
            };
            let result = spawn_blocking_in_span(move || {
                let _guard = guard;
                let staged = record.staged.lock().expect("staged lock");
                match staged.as_ref() {
                    Some(staged) => {
                        placement::keep_replica(&domain, staged, &batch, delta_bytes, pass, schedule).and_then(|at| {
                            let id = &staged.migration_id;
                            if let Some(window) = window {
                                let text = window.map(|w| w.to_string());
                                domain
                                    .inventory
                                    .set_switchover_window(id, text.as_deref())
                                    .map_err(|e| (RefusalCode::EndpointFailure, e.to_string()))?;
                            }
                            // What the cloud holds now (the API may have set it).
                            let held = domain.inventory.switchover_window(id).ok().flatten();
                            Ok((id.clone(), at, held.and_then(|w| w.parse().ok())))
                        })
                    }
                    None => Err((RefusalCode::EndpointFailure, "nothing staged to keep".to_owned())),
                }
            })
            .await
            .expect("keeping a replica does not panic");
            let kept = result.is_ok();
            // Taken before the answer: a plan accepted after it waits for the index.
            let indexing = match (kept, &who) {
                (true, Some(_)) => Some(ctx.domain.indexing.clone().write_owned().await),
                _ => None,
            };
            {
                let mut s = ctx.session();
                match result {
                    Ok((id, switchover_at, window)) => {
                        tracing::info!(migration = %id, delta_bytes, ?switchover_at, ?window, "replica read back and kept");
                        s.synced(&unsynced);
                        s.set_held_window(window);
                        s.replica_kept(Ok(switchover_at));
                    }
                    Err(e) => {
                        tracing::error!(error = %e.1, "cannot keep the replica");
                        s.replica_kept(Err(e));
                    }
                }
            }
            if let (Some(indexing), Some(who)) = (indexing, who) {
                // A replica is a disk the cloud holds: later lifts may copy from it. After
                // the answer, as for a commit: every pass indexes every chunk of the disk.
                ctx.wake();
                let guard = ctx.blocking.clone().read_owned().await;
                let record = ctx.clone();
                let domain = ctx.domain.clone();
                let _ = spawn_blocking_in_span(move || {
                    let (_guard, _indexing) = (guard, indexing);
                    if dedup_bytes > 0 {
                        let _ = domain.inventory.add_dedup_bytes(&who.migration, dedup_bytes);
                    }
                    if let Some(staged) = record.staged.lock().expect("staged lock").as_ref() {
                        dedup::index_replica(&domain, &who, &staged.disks, &hashes);
                    }
                })
                .await;
            }
        }
        ReceiverEvent::Discard { reason } => {
            let staged = ctx.staged.lock().expect("staged lock").take();
            ctx.disks.lock().expect("disks lock").clear();
            let mut discarded = None;
            if let Some(staged) = staged {
                tracing::warn!(?reason, migration = %staged.migration_id, "discarding");
                discarded = Some(staged.migration_id.clone());
                // Its files go: nothing may be copied from them any more.
                let _ = domain.inventory.drop_chunk_sources(&staged.migration_id);
                let guard = ctx.blocking.clone().read_owned().await;
                let why = reason.clone();
                let _ = spawn_blocking_in_span(move || {
                    let _guard = guard;
                    placement::discard(&domain, staged, &why)
                })
                .await;
            }
            // An edge that aborted waits for this close as the confirmation.
            if ctx.session().edge_aborted() {
                let what = discarded.map_or("nothing was staged".to_owned(), |id| format!("{id} discarded"));
                close_refused(ctx, RefusalCode::Aborted, &format!("{what}: {reason}"));
            }
        }
    }
}

/// What a lost lease does to the connection serving the migration: it stops at once, as
/// busy (the edge resumes where the migration is owned now), and its cleanup leaves the
/// staged files to the new owner.
fn stop_when_lost(ctx: &Arc<Ctx>) -> crate::cluster::ownership::OnLost {
    let (conn, lost) = (ctx.conn.clone(), ctx.lease_lost.clone());
    Box::new(move |why| {
        lost.store(true, Ordering::SeqCst);
        transport::close(
            &conn,
            RefusalCode::Busy,
            &format!("this cloud endpoint stops serving the migration: {why}; the edge resumes it at the endpoint that owns it now"),
        );
    })
}

/// Who this connection migrates for, once authenticated and the migration known: the
/// deduplication scope.
fn requester(ctx: &Ctx) -> Option<dedup::Requester> {
    let user = ctx.principal.lock().expect("principal lock").as_ref()?.user.clone();
    let migration = ctx.migration_id.lock().expect("id lock").clone()?;
    Some(dedup::Requester {
        user,
        edge_cert: ctx.edge_cert.clone(),
        migration,
        seed: ctx.seed.lock().expect("seed lock").clone(),
    })
}

/// The seed a plan names, checked and indexed at the plan's chunk size before anything
/// is staged: a refused seed lists the plan's other problems too, and a seed whose
/// hashing stops (the edge went away, a read failed) leaves nothing staged or indexed.
fn prepare_seed(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    plan: &gateway::plan::MigrationPlan,
    conn: &quinn::Connection,
) -> Result<Option<Arc<super::seed::Seed>>, placement::Refusal> {
    let seed = match super::seed::resolve(domain, principal, edge_cert, plan) {
        Ok(None) => return Ok(None),
        Ok(Some(seed)) => seed,
        Err(mut problems) => {
            if let Err((_, more)) = placement::validate(domain, principal, plan) {
                problems.extend(more);
            }
            return Err((RefusalCode::PlanRejected, problems));
        }
    };
    // The plan's own checks first: a plan refused anyway should not cost a seed's hashing.
    placement::validate(domain, principal, plan)?;
    let hashed = super::seed::ensure_indexed(domain, &seed, plan.chunk_size, &|| conn.close_reason().is_some())
        .map_err(|e| (RefusalCode::EndpointFailure, vec![e.to_string()]))?;
    tracing::info!(seed = %seed.vm_id, hashed, "seed checked");
    Ok(Some(Arc::new(seed)))
}

/// Threads that read a migration's staged disks back before its commit: hashing is the
/// cost, and two keep up with a local disk on this kind of machine.
const READ_BACK_THREADS: usize = 2;

/// The staged disks of the migration with their sizes in the plan, and its chunk size:
/// what a read-back reads.
fn staged_disks(ctx: &Ctx) -> Option<(Vec<Arc<crate::datastore::DiskFile>>, Vec<u64>, u32)> {
    let disks = ctx.disks.lock().expect("disks lock").clone();
    ctx.session().plan().map(|p| {
        let capacities: Vec<u64> = p.vm.disks.iter().map(|d| d.capacity).collect();
        (disks, capacities, p.chunk_size)
    })
}

/// The read-back before a commit (see [`crate::datastore::read_back`]): chunks that
/// differ from what was sent are asked for again, and a datastore that cannot be read
/// pauses the migration with what it holds kept.
async fn verify_staged(ctx: &Arc<Ctx>, chunks: Vec<(u16, u64, [u8; 32])>) {
    let Some((disks, capacities, chunk_size)) = staged_disks(ctx) else {
        return;
    };
    let count = chunks.len();
    let started = Instant::now();
    let guard = ctx.blocking.clone().read_owned().await;
    let result = spawn_blocking_in_span(move || {
        let _guard = guard;
        crate::datastore::read_back(&disks, &capacities, chunk_size, &chunks, READ_BACK_THREADS)
    })
    .await
    .expect("the read-back does not panic");
    match result {
        Ok(found) => {
            let secs = started.elapsed().as_secs_f64();
            ctx.domain
                .metrics
                .read_back_chunks
                .with_label_values(&["at_end"])
                .inc_by(count as u64);
            tracing::info!(
                chunks = count,
                bytes = found.bytes_read,
                unallocated = found.unallocated,
                secs,
                damaged = found.damaged.len(),
                rewritten_zero = found.rewritten_zero.len(),
                "staged disks read back"
            );
            for (disk, index) in &found.rewritten_zero {
                tracing::warn!(
                    disk,
                    chunk = index,
                    "a staged chunk that must be zero was not; rewritten with zeros"
                );
            }
            for (disk, index) in found.damaged.iter().take(32) {
                tracing::warn!(
                    disk,
                    chunk = index,
                    "a staged chunk differs from what the edge sent; asking the edge for it again"
                );
            }
            ctx.session().staged_verified(found.damaged);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the staged disks back");
            ctx.session().pause(vec![format!(
                "the endpoint cannot read the staged disks back from datastore {} before the commit: {e}; what arrived is kept: fix the datastore, then run the same migration again to resume",
                ctx.datastore_name(None)
            )]);
        }
    }
}

/// The read-back of a replica while its last pass streams (see
/// [`crate::datastore::read_back_early`]). It stops when the connection ends; a datastore
/// that cannot be read now leaves every chunk to the read-back at the switchover, which
/// reports the error if it persists.
async fn verify_early(ctx: &Arc<Ctx>, chunks: Vec<(u16, u64, [u8; 32])>) {
    let Some((disks, capacities, chunk_size)) = staged_disks(ctx) else {
        return;
    };
    let count = chunks.len();
    let started = Instant::now();
    let guard = ctx.blocking.clone().read_owned().await;
    let conn = ctx.conn.clone();
    let result = spawn_blocking_in_span(move || {
        let _guard = guard;
        let gone = || conn.close_reason().is_some();
        crate::datastore::read_back_early(&disks, &capacities, chunk_size, &chunks, READ_BACK_THREADS, &gone)
    })
    .await
    .expect("the read-back does not panic");
    match result {
        Ok((intact, found)) => {
            tracing::info!(
                chunks = count,
                intact = intact.len(),
                bytes = found.bytes_read,
                unallocated = found.unallocated,
                secs = started.elapsed().as_secs_f64(),
                "replica read back while the switchover's pass streams"
            );
            ctx.domain
                .metrics
                .read_back_chunks
                .with_label_values(&["during_pass"])
                .inc_by(count as u64);
            ctx.session().verified_early(intact);
        }
        Err(_) if ctx.conn.close_reason().is_some() => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the replica back while the pass streams; the switchover reads all of it");
            ctx.session().verified_early(Vec::new());
        }
    }
}

async fn accept_data(ctx: Arc<Ctx>) {
    let mut streams = tokio::task::JoinSet::new();
    while let Ok(recv) = ctx.conn.accept_uni().await {
        let ctx = ctx.clone();
        streams.spawn(
            async move {
                if let Err(e) = data_stream(&ctx, recv).await {
                    if !ctx.session().is_finished() {
                        tracing::warn!(error = %e, "data stream failed");
                        close_refused(&ctx, RefusalCode::ProtocolViolation, &e.to_string());
                    }
                }
            }
            .in_current_span(),
        );
    }
    streams.abort_all();
}

/// Buffers a data task moves into the blocking pool and back.
struct Bufs {
    opener: Opener,
    payload: Vec<u8>,
    plain: Vec<u8>,
}

async fn data_stream(ctx: &Arc<Ctx>, recv: quinn::RecvStream) -> Result<(), TransportError> {
    let mut reader = DataReader::open(recv).await?;
    let mut bufs = Some(Bufs {
        opener: Opener::new().expect("zstd decompressor"),
        payload: Vec::new(),
        plain: Vec::new(),
    });
    while let Some(header) = reader.next_header().await? {
        let admission = ctx.session().admit_chunk(&header);
        let admission = match admission {
            Ok(a) => a,
            Err(e) => {
                ctx.wake();
                tracing::warn!(error = %e, "chunk refused");
                reader.stop(e.code().close_code());
                return Ok(());
            }
        };
        let mut b = bufs.take().expect("buffers returned after each chunk");
        // The payload is read at the caps, piece by piece: what waits stays in quinn's
        // receive buffer, the edge's flow-control credit runs out (the connection's window
        // is sized from the cap) and its sender slows to the cap from the first byte.
        let caps = &ctx.caps;
        let pace = |bytes: u64| async move {
            for cap in caps {
                cap.acquire(bytes).await;
            }
        };
        pace(gateway::wire::CHUNK_HEADER_LEN as u64).await;
        reader.read_payload_paced(&header, &mut b.payload, pace).await?;
        let metrics = &ctx.domain.metrics;
        metrics.received_payload_bytes.inc_by(u64::from(header.payload_len));
        if admission == Admission::Duplicate {
            metrics.chunks_resent.inc();
            bufs = Some(b);
            ctx.wake();
            continue;
        }
        let Some(file) = ctx
            .disks
            .lock()
            .expect("disks lock")
            .get(usize::from(header.disk))
            .cloned()
        else {
            return Ok(());
        };
        let (b, outcome) = spawn_blocking_in_span(move || {
            let outcome = match b.opener.open(&header, &b.payload, &mut b.plain) {
                Ok(plain) => Ok(file.write_at(plain, header.offset)),
                Err(e) => Err(e),
            };
            // Re-borrow: `plain` above borrowed b's buffers.
            let b = b;
            (b, outcome)
        })
        .await
        .expect("verification does not panic");
        bufs = Some(b);
        match outcome {
            Ok(Ok(())) => {
                let sealing = {
                    let mut s = ctx.session();
                    s.chunk_written(header.disk, header.offset);
                    s.seal_waits_for_sync()
                };
                if sealing {
                    ctx.sync_now.notify_one();
                }
                metrics.received_logical_bytes.inc_by(u64::from(header.plain_len));
            }
            Ok(Err(io)) => {
                // Nothing written so far is lost: the migration pauses and
                // resumes once the datastore can take data again.
                tracing::error!(error = %io, "datastore write failed");
                let what = if io.raw_os_error() == Some(nix::libc::ENOSPC) {
                    format!("datastore {} is full", ctx.datastore_name(Some(header.disk)))
                } else {
                    format!("datastore {} failed a write", ctx.datastore_name(Some(header.disk)))
                };
                ctx.session().pause(vec![format!(
                    "{what} (disk {} at offset {}: {io}); the migration is paused with what arrived kept: free space or fix the datastore, then run the same migration again to resume",
                    header.disk, header.offset
                )]);
            }
            Err(e) => {
                tracing::warn!(disk = header.disk, offset = header.offset, error = %e, "chunk failed verification");
                metrics.chunks_rejected.inc();
                let _ = ctx.session().chunk_rejected(header.disk, header.offset, &e);
            }
        }
        ctx.wake();
    }
    Ok(())
}
