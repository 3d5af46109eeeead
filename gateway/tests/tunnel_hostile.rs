//! A striped tunnel's receiving side ([`gateway::tunnel::splice`]) against a hostile
//! peer, over real QUIC on loopback: two quinn endpoints in this process, with the
//! project's TLS (a test CA, an endpoint and an edge certificate) and transport tuning.
//! The peer writes raw tunnel frames (made by the real encoder) on the lanes it opens,
//! as the edge's or the cloud's `pump_out` would, but breaking the protocol's rule:
//! frame `s` on lane `s % lanes`, each lane in order. Each breach must end the splice
//! with the named protocol violation, and a peer that floods one lane while the others
//! stay silent must be held by QUIC's flow control: the receiver takes at most one
//! frame per lane off the streams, whatever the peer has queued.

use std::sync::Arc;
use std::time::Duration;

use certs::{Ca, Validity};
use gateway::transport::{
    self, allow_streams, bind_udp, client_crypto, server_crypto, Identity, ServerTrust, StreamPhase, TransportTuning,
    STREAM_WINDOW,
};
use gateway::tunnel::{splice, FrameEncoder, ReorderError, TunnelError, TunnelStats, FRAME_HEAD, MAX_PLAIN};

const LANES: usize = 4;

/// The two ends of one QUIC connection on loopback.
struct Link {
    /// The hostile peer (the client).
    peer: quinn::Connection,
    /// The receiving side (the server).
    receiver: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn link() -> Link {
    let ca = Ca::generate("tunnel test CA").unwrap();
    let server = ca.issue_endpoint(&["localhost".into()], Validity::days(1)).unwrap();
    let client = ca.issue_edge("edge-hostile", Validity::days(1)).unwrap();
    let tuning = TransportTuning::default();
    let crypto = server_crypto(vec![server.cert_der()], server.key_der(), &[ca.cert_der()]).unwrap();
    let socket = bind_udp("127.0.0.1:0".parse().unwrap(), &tuning).unwrap();
    let server_endpoint = transport::server_endpoint(socket, crypto, &tuning).unwrap();
    let addr = server_endpoint.local_addr().unwrap();
    let identity = Identity {
        chain: vec![client.cert_der()],
        key: client.key_der(),
    };
    let crypto = client_crypto(identity, ServerTrust::Ca(vec![ca.cert_der()])).unwrap();
    let client_endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &tuning).unwrap();
    let accepting = async {
        let incoming = server_endpoint.accept().await.expect("an incoming connection");
        incoming.await.expect("server handshake")
    };
    let (peer, receiver) = tokio::join!(transport::connect(&client_endpoint, addr, "localhost"), accepting);
    // As the endpoint does when a live migration's tunnels open.
    allow_streams(
        &receiver,
        StreamPhase::Tunnels {
            tunnels: 1,
            lanes: LANES as u16,
        },
    );
    Link {
        peer: peer.expect("client handshake"),
        receiver,
        _endpoints: (server_endpoint, client_endpoint),
    }
}

/// A running splice on the receiving side, and the peer's lanes.
struct Tunnel {
    lanes: Vec<quinn::SendStream>,
    stats: Arc<TunnelStats>,
    spliced: tokio::task::JoinHandle<Result<(u64, u64), TunnelError>>,
    /// The receiver's local side (the hypervisor's socket, here a pipe): kept open.
    local: tokio::io::DuplexStream,
    _link: Link,
}

/// Opens `LANES` lanes from the peer; the receiver splices them. Each lane starts with
/// its number, standing in for the real tunnel header, so that the receiver sees the
/// stream (QUIC announces a stream with its first bytes) and knows its place.
async fn tunnel() -> Tunnel {
    let link = link().await;
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let (mut send, _recv) = link.peer.open_bi().await.unwrap();
        send.write_all(&[lane as u8]).await.unwrap();
        lanes.push(send);
    }
    let mut accepted: Vec<Option<(quinn::SendStream, quinn::RecvStream)>> = (0..LANES).map(|_| None).collect();
    for _ in 0..LANES {
        let (send, mut recv) = link.receiver.accept_bi().await.expect("a lane");
        let mut lane = [0u8];
        recv.read_exact(&mut lane).await.unwrap();
        accepted[usize::from(lane[0])] = Some((send, recv));
    }
    let streams = accepted.into_iter().map(|l| l.expect("every lane")).collect();
    let (local, far) = tokio::io::duplex(MAX_PLAIN);
    let stats = Arc::new(TunnelStats::default());
    let spliced = tokio::spawn(splice(far, streams, 1, stats.clone()));
    Tunnel {
        lanes,
        stats,
        spliced,
        local,
        _link: link,
    }
}

impl Tunnel {
    /// Frame `seq` of `plain` on lane `lane`, as the real encoder makes it.
    async fn send(&mut self, lane: usize, seq: u64, plain: &[u8]) -> Result<(), quinn::WriteError> {
        let mut frame = Vec::new();
        FrameEncoder::new(1).unwrap().encode(seq, plain, &mut frame);
        self.lanes[lane].write_all(&frame).await
    }

    /// How the splice ended: it must end, with a protocol violation.
    async fn violation(self) -> ReorderError {
        let ended = tokio::time::timeout(Duration::from_secs(10), self.spliced)
            .await
            .expect("the splice ends within 10 s of the violation")
            .unwrap();
        match ended {
            Err(e @ TunnelError::Order(_)) => {
                assert!(e.is_peer_violation(), "{e}");
                assert!(e.to_string().starts_with("tunnel protocol violation: "), "{e}");
                let TunnelError::Order(v) = e else { unreachable!() };
                v
            }
            other => panic!("expected a protocol violation, got {other:?}"),
        }
    }
}

/// Bytes nobody compresses: frames travel raw, so the wire size is the plaintext's.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_frame_ends_the_tunnel_as_a_duplicate() {
    let mut t = tunnel().await;
    t.send(0, 0, b"frame zero").await.unwrap();
    t.send(1, 1, b"frame one").await.unwrap();
    // Frame 0 again, on its own lane, after it was delivered.
    t.send(0, 0, b"frame zero").await.unwrap();
    let v = t.violation().await;
    assert_eq!(
        v,
        ReorderError::Duplicate {
            seq: 0,
            lane: 0,
            expected: LANES as u64
        }
    );
    assert!(v.to_string().contains("arrived twice"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_a_lane_ends_the_tunnel_beyond_the_window() {
    let mut t = tunnel().await;
    t.send(0, 0, b"frame zero").await.unwrap();
    // Lane 0 skips its frame 4 and sends 8: however long the receiver waited, 4 would
    // never come.
    t.send(0, 8, b"frame eight").await.unwrap();
    let v = t.violation().await;
    assert_eq!(
        v,
        ReorderError::BeyondWindow {
            seq: 8,
            next: 1,
            window: LANES as u64
        }
    );
    assert!(v.to_string().contains("reorder window of 4"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_on_the_wrong_lane_ends_the_tunnel() {
    let mut t = tunnel().await;
    // Frame 2 belongs on lane 2.
    t.send(1, 2, b"frame two").await.unwrap();
    let v = t.violation().await;
    assert_eq!(
        v,
        ReorderError::WrongLane {
            seq: 2,
            lane: 1,
            lanes: LANES,
            expected: 1
        }
    );
    assert!(v.to_string().contains("frame N on stream N mod 4"), "{v}");

    // Frame 0, never sent, on lane 1: also the wrong lane, not a duplicate.
    let mut t = tunnel().await;
    t.send(1, 0, b"frame zero").await.unwrap();
    assert!(matches!(
        t.violation().await,
        ReorderError::WrongLane { seq: 0, lane: 1, .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_on_one_lane_ends_the_tunnel_at_the_second() {
    let mut t = tunnel().await;
    // A peer that ignores the striping and floods lane 0 with frames 0, 1, 2, ...: the
    // writes may all be queued, the receiver refuses at frame 1.
    let flood = noise(MAX_PLAIN, 1);
    let mut refused_at = None;
    for seq in 0..64 {
        match tokio::time::timeout(Duration::from_secs(5), t.send(0, seq, &flood)).await {
            Ok(Ok(())) => {}
            // The receiver gave up on the stream, or stopped reading it.
            Ok(Err(_)) | Err(_) => {
                refused_at = Some(seq);
                break;
            }
        }
    }
    let v = t.violation().await;
    assert_eq!(
        v,
        ReorderError::WrongLane {
            seq: 1,
            lane: 0,
            lanes: LANES,
            expected: LANES as u64
        }
    );
    // It was refused before the peer got far: the receiver read two frames, QUIC's
    // window held the rest.
    let frame = (MAX_PLAIN + FRAME_HEAD) as u64;
    assert!(
        refused_at.is_some_and(|s| s * frame <= STREAM_WINDOW + 3 * frame),
        "the peer wrote {refused_at:?} frames of {frame} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_lane_is_held_to_one_frame_and_its_window_then_ending_the_others_is_a_violation() {
    let mut t = tunnel().await;
    // Lane 0 sends its own frames 0, 4, 8, ... as fast as QUIC lets it, 16 MiB worth;
    // lanes 1 to 3 stay silent, so frame 1 never comes.
    let flood = noise(MAX_PLAIN, 2);
    let frame = (MAX_PLAIN + FRAME_HEAD) as u64;
    let mut written = 0u64;
    for n in 0..64u64 {
        match tokio::time::timeout(Duration::from_secs(2), t.send(0, n * LANES as u64, &flood)).await {
            Ok(Ok(())) => written += frame,
            Ok(Err(e)) => panic!("the receiver refused a stalled but valid lane: {e}"),
            // Blocked: the lane's window is full and the receiver reads no more of it.
            Err(_) => break,
        }
    }
    // The peer got a stream window and the frames the receiver took off it, no more.
    assert!(
        written <= STREAM_WINDOW + 3 * frame,
        "the peer wrote {written} bytes into one stalled lane (window {STREAM_WINDOW})"
    );
    // The receiver took frame 0 (delivered) and frame 4 (held for frame 1): two frames,
    // one per lane at most, whatever the peer queued.
    let (plain_out, _, plain_in, wire_in) = t.stats.snapshot();
    assert_eq!(plain_out, 0);
    assert_eq!(plain_in, MAX_PLAIN as u64, "frame 0 delivered, nothing after it");
    assert_eq!(
        wire_in,
        2 * frame,
        "the receiver read frames 0 and 4 off the lane and no more"
    );
    assert!(!t.spliced.is_finished(), "a stalled lane is a wait, not an error");

    // The peer ends lanes 1 to 3 owing frames 1 to 3: the tunnel is refused, not stalled.
    for lane in 1..LANES {
        t.lanes[lane].finish().unwrap();
    }
    let stats = t.stats.clone();
    let v = t.violation().await;
    match v {
        ReorderError::EndedEarly { lane, missing } => {
            assert!((1..LANES).contains(&lane), "{v}");
            assert_eq!(missing, lane as u64, "{v}");
        }
        other => panic!("expected a lane ended early, got {other}"),
    }
    let (_, _, plain_in, wire_in) = stats.snapshot();
    assert_eq!((plain_in, wire_in), (MAX_PLAIN as u64, 2 * frame));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_peer_out_of_lane_order_gets_every_byte_in_order() {
    // The control: the same setup passes data when the peer keeps the rule, whatever
    // order its lanes deliver in, so the refusals above come from the breaches alone.
    use tokio::io::AsyncReadExt;
    let mut t = tunnel().await;
    let frames: Vec<Vec<u8>> = (0..12).map(|i| noise(1000 + i * 7, i as u64)).collect();
    for round in 0..3 {
        // Lanes 3, 2, 1 before 0 in each round.
        for lane in (0..LANES).rev() {
            let seq = round * LANES + lane;
            t.send(lane, seq as u64, &frames[seq]).await.unwrap();
        }
    }
    for lane in &mut t.lanes {
        lane.finish().unwrap();
    }
    let want: Vec<u8> = frames.concat();
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(10), t.local.read_exact(&mut got))
        .await
        .expect("every frame within 10 s")
        .unwrap();
    assert!(got == want, "the bytes came out of order");
    let mut rest = Vec::new();
    t.local.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{} bytes past the end", rest.len());
}
