//! A UDP relay on 127.0.0.1 between edge agents and an endpoint, with a switch that
//! drops datagrams: a link cut without root, namespaces or a WAN emulator.
//!
//! Each edge socket (every reconnect binds a new one) gets its own upstream socket, so
//! the endpoint sees a distinct peer per edge connection, as it would through NAT.
//! Counting those sockets tells a test when an edge gave up its connection and dialled
//! again. The relay also logs when each datagram toward the endpoint crossed it and its
//! size: the link's traffic as a network team's capture would show it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Largest UDP datagram.
const DATAGRAM: usize = 65_535;

#[derive(Debug, Default)]
struct Switch {
    /// Drop edge -> endpoint datagrams.
    up_cut: AtomicBool,
    /// Drop endpoint -> edge datagrams.
    down_cut: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Edge sockets seen, in order of their first datagram (dropped or not).
    edges: Mutex<Vec<SocketAddr>>,
    /// (arrival, bytes) of every edge -> endpoint datagram forwarded.
    upstream: Mutex<Vec<(Instant, usize)>>,
}

impl Switch {
    /// Counts the datagram; true if it is to be forwarded.
    fn pass(&self, cut: &AtomicBool) -> bool {
        if cut.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

/// A running relay; dropping it stops forwarding.
#[derive(Debug)]
pub struct Relay {
    /// Where edges connect instead of the endpoint.
    pub addr: SocketAddr,
    switch: Arc<Switch>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Forwards between edges that send to [`Relay::addr`] and `endpoint`.
    pub async fn start(endpoint: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind the relay"));
        let addr = front.local_addr().expect("relay address");
        let switch = Arc::new(Switch::default());
        let task = tokio::spawn(forward(front, endpoint, switch.clone()));
        Relay { addr, switch, task }
    }

    /// Drops every datagram both ways until [`Relay::restore`]: the link is gone.
    pub fn cut(&self) {
        self.switch.up_cut.store(true, Ordering::SeqCst);
        self.switch.down_cut.store(true, Ordering::SeqCst);
    }

    /// Drops only what the endpoint sends: the edge hears nothing and gives up its
    /// connection, while the endpoint still hears the edge's retransmissions and
    /// keep-alives and so holds the connection until well after the edge gave up.
    pub fn cut_from_endpoint(&self) {
        self.switch.down_cut.store(true, Ordering::SeqCst);
    }

    /// Forwards both ways again.
    pub fn restore(&self) {
        self.switch.up_cut.store(false, Ordering::SeqCst);
        self.switch.down_cut.store(false, Ordering::SeqCst);
    }

    /// Edge sockets seen so far: 1 per connection an edge opened through the relay.
    pub fn edge_sockets(&self) -> usize {
        self.switch.edges.lock().expect("edges lock").len()
    }

    pub fn dropped(&self) -> u64 {
        self.switch.dropped.load(Ordering::Relaxed)
    }

    pub fn forwarded(&self) -> u64 {
        self.switch.forwarded.load(Ordering::Relaxed)
    }

    /// When each datagram from the edges to the endpoint crossed the relay, and its
    /// UDP payload size, in order.
    pub fn upstream_log(&self) -> Vec<(Instant, usize)> {
        self.switch.upstream.lock().expect("upstream lock").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The per-edge tasks live in the forward task's JoinSet and end with it.
        self.task.abort();
    }
}

async fn forward(front: Arc<UdpSocket>, endpoint: SocketAddr, switch: Arc<Switch>) {
    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut downstream = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let Ok((n, edge)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let arrived = Instant::now();
        let up = match upstream.get(&edge) {
            Some(s) => s.clone(),
            None => {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if s.connect(endpoint).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                switch.edges.lock().expect("edges lock").push(edge);
                upstream.insert(edge, s.clone());
                downstream.spawn(back(s.clone(), front.clone(), edge, switch.clone()));
                s
            }
        };
        if switch.pass(&switch.up_cut) {
            switch.upstream.lock().expect("upstream lock").push((arrived, n));
            // A full socket buffer loses the datagram, as a congested link would.
            let _ = up.send(&buf[..n]).await;
        }
    }
}

/// Endpoint -> one edge.
async fn back(up: Arc<UdpSocket>, front: Arc<UdpSocket>, edge: SocketAddr, switch: Arc<Switch>) {
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let Ok(n) = up.recv(&mut buf).await else {
            // ICMP port unreachable from a stopped endpoint; keep serving.
            continue;
        };
        if switch.pass(&switch.down_cut) {
            let _ = front.send_to(&buf[..n], edge).await;
        }
    }
}
