//! Entry points of the fuzz targets in `fuzz/`: each takes arbitrary bytes, as
//! a hostile peer would send them, and must neither panic nor allocate beyond
//! the protocol's limits. The regression tests replay every saved input in
//! `fuzz/regressions/<target>/` through the same functions.

use std::time::{Duration, Instant};

use crate::protocol::{Admission, ReceiverConfig, ReceiverEvent, ReceiverSession};
use crate::wire::probe::{self, CloudProbe, EdgeProbe};
use crate::wire::{control, ChunkHeader, CloudMessage, Decoded, EdgeMessage, Preamble, CHUNK_HEADER_LEN, PREAMBLE_LEN};

/// Control frames both ways: whatever decodes re-encodes to the same message.
pub fn control_frame(data: &[u8]) {
    if let Ok(Decoded::Frame(msg, used)) = control::decode::<EdgeMessage>(data) {
        assert!(used <= data.len());
        let again = control::encode(&msg).expect("a decoded message encodes");
        assert!(matches!(control::decode::<EdgeMessage>(&again), Ok(Decoded::Frame(m, _)) if m == msg));
    }
    if let Ok(Decoded::Frame(msg, _)) = control::decode::<CloudMessage>(data) {
        let again = control::encode(&msg).expect("a decoded message encodes");
        assert!(matches!(control::decode::<CloudMessage>(&again), Ok(Decoded::Frame(m, _)) if m == msg));
    }
    // Link-test probe messages share the framing, so the same inputs reach them.
    if let Ok(Decoded::Frame(msg, _)) = probe::decode::<EdgeProbe>(data) {
        let again = probe::encode(&msg).expect("a decoded message encodes");
        assert!(matches!(probe::decode::<EdgeProbe>(&again), Ok(Decoded::Frame(m, _)) if m == msg));
    }
    if let Ok(Decoded::Frame(msg, _)) = probe::decode::<CloudProbe>(data) {
        let again = probe::encode(&msg).expect("a decoded message encodes");
        assert!(matches!(probe::decode::<CloudProbe>(&again), Ok(Decoded::Frame(m, _)) if m == msg));
    }
}

/// Stream preambles and chunk headers.
pub fn chunk_frame(data: &[u8]) {
    if let Some(p) = data.get(..PREAMBLE_LEN) {
        let _ = Preamble::decode(p.try_into().expect("preamble length"));
    }
    if let Some(h) = data.get(..CHUNK_HEADER_LEN) {
        if let Ok(header) = ChunkHeader::decode(h.try_into().expect("header length")) {
            assert_eq!(ChunkHeader::decode(&header.encode()), Ok(header));
        }
    }
}

/// A receiver session fed a hostile edge's messages and chunk headers, with
/// a driver that accepts every credential and plan: the state machine must
/// stay consistent whatever the order.
pub fn receiver(data: &[u8]) {
    let start = Instant::now();
    let mut session = ReceiverSession::new(ReceiverConfig::default(), start);
    let mut rest = data;
    let mut step = 0u32;
    while let Some((&tag, tail)) = rest.split_first() {
        rest = tail;
        step += 1;
        let now = start + Duration::from_millis(u64::from(step));
        match tag % 4 {
            0 => match control::decode::<EdgeMessage>(rest) {
                Ok(Decoded::Frame(msg, used)) => {
                    rest = &rest[used..];
                    let _ = session.handle_control(msg, now);
                }
                _ => break,
            },
            1 => {
                let Some(h) = rest.get(..CHUNK_HEADER_LEN) else { break };
                rest = &rest[CHUNK_HEADER_LEN..];
                if let Ok(header) = ChunkHeader::decode(h.try_into().expect("header length")) {
                    if let Ok(Admission::Write) = session.admit_chunk(&header) {
                        if tag & 0x80 == 0 {
                            session.chunk_written(header.disk, header.offset);
                        } else {
                            let _ = session.chunk_rejected(
                                header.disk,
                                header.offset,
                                &crate::chunk::ChunkError::HashMismatch,
                            );
                        }
                    }
                }
            }
            2 => session.handle_timeout(now + Duration::from_secs(u64::from(tag))),
            // The driver's periodic sync: what was written becomes acknowledged.
            3 => {
                let batch = session.take_unsynced();
                session.synced(&batch);
            }
            _ => {}
        }
        while let Some(event) = session.poll_event() {
            match event {
                ReceiverEvent::Authenticate { .. } => session.authenticated(Ok("Administrator".into()), "fuzz"),
                ReceiverEvent::ValidatePlan(_) => session.plan_accepted("migration-1".into(), "ds".into(), true),
                // A journal holding the first chunk, plus a table of no disk of the plan.
                ReceiverEvent::ValidateResume { migration_id, plan, .. } => {
                    let mut tables: Vec<crate::integrity::DiskHashes> = plan
                        .vm
                        .disks
                        .iter()
                        .map(|d| crate::integrity::DiskHashes::new(d.capacity, plan.chunk_size))
                        .collect();
                    if let Some(t) = tables.first_mut() {
                        t.set(0, [1; 32]);
                    }
                    tables.push(crate::integrity::DiskHashes::new(4096, 4096));
                    session.resume_accepted(migration_id, "ds".into(), tables)
                }
                ReceiverEvent::Finalize => session.finalized(Ok(crate::protocol::Registered {
                    vm_id: "vm-1".into(),
                    vm_path: "[ds] x/x.vmx".into(),
                    receipt: String::new(),
                    report: None,
                })),
                // The read-back finds the first chunk it was given damaged, the tag
                // deciding: repairs and clean read-backs both get exercised.
                ReceiverEvent::VerifyStaged { chunks } => {
                    let damaged = chunks
                        .first()
                        .filter(|_| tag & 0x40 != 0)
                        .map(|&(disk, index, _)| vec![(disk, index)])
                        .unwrap_or_default();
                    session.staged_verified(damaged)
                }
                // The early read-back finds every chunk but the first intact, the tag
                // deciding; reported at once (before the commit, or after it).
                ReceiverEvent::VerifyEarly { chunks } => {
                    let skip = usize::from(tag & 0x20 != 0);
                    session.verified_early(chunks.iter().skip(skip).map(|c| (c.0, c.1)).collect())
                }
                ReceiverEvent::Discard { .. } => {}
                ReceiverEvent::CheckPlan(_) => {
                    session.plan_checked(Err((crate::wire::RefusalCode::PlanRejected, vec![])))
                }
                ReceiverEvent::AbortMigration { .. } => session.migration_aborted(Ok(())),
                ReceiverEvent::KeepReplica { .. } => session.replica_kept(Ok(None)),
                ReceiverEvent::EndSwitchover { .. } => session.switchover_ended(Ok(String::new())),
                // Every other chunk "found" in the cloud: copies and sends both get exercised.
                ReceiverEvent::Lookup { disk, chunks } => {
                    let results = chunks.iter().enumerate().map(|(i, c)| (c.0, i % 2 == 0)).collect();
                    session.lookup_done(disk, results)
                }
            }
        }
        while session.poll_transmit().is_some() {}
    }
}

/// A live migration's control frames as a hostile edge sends them, one after another:
/// whatever decodes re-encodes to the same message, plans are checked against the limits,
/// and the frames drive the cloud's live session (whose driver agrees to everything, a
/// second passing per frame so the deadlines fire), which must never panic. The same
/// bytes reach the cloud's messages and the tunnel header.
pub fn live_control(data: &[u8]) {
    use crate::protocol::live::{LiveEvent, LiveReceiver, LiveTimeouts};
    use crate::wire::live::{LiveCloudMessage, LiveEdgeMessage, TunnelHeader};
    fn round_trip<M>(msg: &M)
    where
        M: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let again = control::encode(msg).expect("a decoded message encodes");
        assert!(matches!(control::decode::<M>(&again), Ok(Decoded::Frame(m, _)) if m == *msg));
    }
    if let Ok(Decoded::Frame(msg, _)) = control::decode::<LiveCloudMessage>(data) {
        round_trip(&msg);
    }
    if let Ok(Decoded::Frame(msg, _)) = control::decode::<TunnelHeader>(data) {
        round_trip(&msg);
    }
    let start = Instant::now();
    let mut session = LiveReceiver::new(LiveTimeouts::default(), start);
    let mut rest = data;
    let mut now = start;
    while let Ok(Decoded::Frame(msg, used)) = control::decode::<LiveEdgeMessage>(rest) {
        round_trip(&msg);
        if let LiveEdgeMessage::Plan(plan) = &msg {
            let _ = plan.check_limits();
        }
        rest = &rest[used..];
        let _ = session.handle(msg);
        while let Some(event) = session.poll_event() {
            match event {
                LiveEvent::Authenticate { .. } => session.authenticated(Ok(("fuzz".into(), "Administrator".into()))),
                LiveEvent::CheckPlan(_) => session.plan_checked(Ok(())),
                LiveEvent::StartDestination => session.destination_ready("migration-1".into(), vec![], now),
                LiveEvent::Switchover => session.committed("vm-1".into(), Default::default()),
                LiveEvent::BootBytes { .. } | LiveEvent::TearDown { .. } => {}
            }
        }
        while session.poll_transmit().is_some() {}
        now += Duration::from_secs(1);
        session.progress(now);
        session.handle_timeout(now);
    }
}

/// A striped tunnel's reorder buffer fed a hostile peer's frames, as the lane readers
/// hand them over: each op is a frame head (its body length and sequence number, checked
/// by the real [`crate::tunnel::FrameDecoder::head`]) arriving on some lane, a lane
/// ending, or the driver taking what is in order. A model of the protocol rule (frame
/// `s` on lane `s % lanes`, each lane in order, a lane read again only once its frame
/// was delivered) says what must happen; the buffer must agree: deliver every frame
/// once and in order, refuse with the violation the model names, never hold more than
/// one frame (and [`crate::tunnel::MAX_PLAIN`] bytes) per lane, and never panic. The
/// first refusal ends the run, as it ends the tunnel.
pub fn tunnel_reorder(data: &[u8]) {
    use crate::tunnel::{FrameDecoder, Reorder, ReorderError, FRAME_HEAD, MAX_PLAIN};
    use crate::wire::live::MAX_TUNNEL_LANES;
    use std::collections::BTreeSet;

    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let lanes = usize::from(first) % usize::from(MAX_TUNNEL_LANES) + 1;
    let window = lanes as u64;
    let mut buffer: Reorder<(u64, usize)> = Reorder::new(lanes);
    // The model: frames accepted (held or delivered), lanes ended, frames delivered.
    let mut received = BTreeSet::new();
    let mut ended = vec![false; lanes];
    let mut delivered = 0u64;
    // Whether the run ended on a refusal (of the decoder or the buffer), as the tunnel would.
    let mut refused = false;
    let due = |received: &BTreeSet<u64>, lane: usize| {
        // A lane's next frame: the first of its own not received yet.
        (lane as u64..)
            .step_by(lanes)
            .find(|s| !received.contains(s))
            .unwrap_or(u64::MAX)
    };
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (got, tail) = (rest.get(..n)?, rest.get(n..)?);
        *rest = tail;
        Some(got)
    }
    while let Some(&[op]) = take(&mut rest, 1) {
        match op % 4 {
            // A frame: lane, length (3 bytes, the top bit of the op is the compressed
            // bit), and a sequence number near the next one due, or any.
            0 | 1 => {
                let Some(&[lane, len_hi, len_mid, len_lo, delta]) = take(&mut rest, 5) else {
                    break;
                };
                let seq = if op & 0x08 != 0 {
                    let Some(raw) = take(&mut rest, 8) else { break };
                    u64::from_be_bytes(raw.try_into().expect("8 bytes"))
                } else {
                    delivered.saturating_add_signed(i64::from(delta as i8))
                };
                // Mostly on the right lane, so that long runs get through.
                let lane = match op & 0x30 {
                    0x00 | 0x10 => (seq % window) as usize,
                    0x20 => usize::from(lane) % lanes,
                    _ => usize::from(lane),
                };
                let mut head = [0u8; FRAME_HEAD];
                let len = u32::from_be_bytes([op & 0x80, len_hi, len_mid, len_lo]);
                head[..4].copy_from_slice(&len.to_be_bytes());
                head[4..].copy_from_slice(&seq.to_be_bytes());
                // A head the decoder refuses never reaches the buffer.
                let Ok(head) = FrameDecoder::head(head) else {
                    refused = true;
                    break;
                };
                assert!(head.len <= MAX_PLAIN && head.seq == seq);
                let could_read = buffer.may_read(lane);
                let outcome = buffer.accept(lane, seq, (seq, head.len));
                let wanted = if lane >= lanes {
                    Some("NoSuchLane")
                } else if ended[lane] {
                    Some("AfterEnd")
                } else if seq < delivered || received.contains(&seq) {
                    Some("Duplicate")
                } else if seq >= delivered.saturating_add(window) {
                    Some("BeyondWindow")
                } else if seq != due(&received, lane) {
                    Some("WrongLane")
                } else if (0..lanes).any(|l| ended[l] && due(&received, l) < seq) {
                    Some("EndedEarly")
                } else {
                    None
                };
                let named = match &outcome {
                    Ok(()) => None,
                    Err(ReorderError::NoSuchLane { .. }) => Some("NoSuchLane"),
                    Err(ReorderError::AfterEnd { .. }) => Some("AfterEnd"),
                    Err(ReorderError::Duplicate { .. }) => Some("Duplicate"),
                    Err(ReorderError::BeyondWindow { .. }) => Some("BeyondWindow"),
                    Err(ReorderError::WrongLane { .. }) => Some("WrongLane"),
                    Err(ReorderError::EndedEarly { .. }) => Some("EndedEarly"),
                };
                assert_eq!(named, wanted, "frame {seq} on lane {lane} of {lanes}: {outcome:?}");
                if outcome.is_err() {
                    refused = true;
                    break;
                }
                // The bound holds whatever the driver does: a lane that holds a frame
                // takes no other.
                assert!(could_read, "lane {lane} took a second frame while holding one");
                received.insert(seq);
            }
            2 => {
                let Some(&[lane]) = take(&mut rest, 1) else { break };
                let lane = usize::from(lane) % (lanes + 1);
                let outcome = buffer.end(lane);
                let wanted = if lane >= lanes {
                    Some("NoSuchLane")
                } else {
                    let owed = due(&received, lane);
                    ended[lane] = true;
                    received.range(delivered..).any(|&s| s > owed).then_some("EndedEarly")
                };
                let named = match &outcome {
                    Ok(()) => None,
                    Err(ReorderError::NoSuchLane { .. }) => Some("NoSuchLane"),
                    Err(ReorderError::EndedEarly { .. }) => Some("EndedEarly"),
                    Err(e) => panic!("ending lane {lane} refused as {e}"),
                };
                assert_eq!(named, wanted, "end of lane {lane} of {lanes}: {outcome:?}");
                if outcome.is_err() {
                    refused = true;
                    break;
                }
            }
            _ => {
                while let Some((lane, (seq, _))) = buffer.pop() {
                    assert_eq!(seq, delivered, "delivered out of order");
                    assert_eq!(lane, (seq % window) as usize);
                    delivered += 1;
                }
                assert!(
                    !received.contains(&delivered),
                    "frame {delivered} is here but not delivered"
                );
            }
        }
        assert!(buffer.held() <= lanes);
        assert_eq!(buffer.held() as u64, received.len() as u64 - delivered);
        assert_eq!(buffer.delivered(), delivered);
    }
    // Every lane ended and nothing was refused: what is held is all in order, and nothing
    // is owed.
    if !refused && ended.iter().all(|e| *e) {
        while buffer.pop().is_some() {}
        assert!(buffer.is_finished(), "every lane ended cleanly, yet frames are held");
    }
}
