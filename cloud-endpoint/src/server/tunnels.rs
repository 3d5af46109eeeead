//! Gathers the streams ("lanes") of a live migration's striped tunnels (protocol
//! version 10): each lane's header names its tunnel, its lane and the tunnel's lane
//! count, and a tunnel is connected to the destination once all its lanes are here.
//! No I/O: the connection hands it each stream with its header.

use std::collections::{HashMap, HashSet};

use gateway::wire::live::{TunnelHeader, TunnelKind};

/// One tunnel stream.
#[derive(Debug)]
pub struct Lane {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

#[derive(Debug)]
struct Partial<S> {
    kind: TunnelKind,
    lanes: Vec<Option<S>>,
    missing: usize,
}

/// The tunnels of one migration whose lanes are arriving, and the numbers used so far.
#[derive(Debug)]
pub struct Lanes<S = Lane> {
    /// Lanes per tunnel the plan allows.
    most_lanes: u16,
    /// Tunnels the migration may open over its life.
    most_tunnels: u32,
    partial: HashMap<u32, Partial<S>>,
    /// Every tunnel number seen, complete or not: a number is used once.
    seen: HashSet<u32>,
}

impl<S> Lanes<S> {
    pub fn new(most_lanes: u16, most_tunnels: u32) -> Self {
        Lanes {
            most_lanes: most_lanes.max(1),
            most_tunnels,
            partial: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    /// Adds the lane `header` describes. `Ok(Some(lanes))`, in lane order, when it was
    /// the tunnel's last; `Err` says what the peer did wrong (a protocol violation).
    pub fn add(&mut self, header: &TunnelHeader, stream: S) -> Result<Option<Vec<S>>, String> {
        let (tunnel, lane, lanes) = (header.tunnel, header.lane, header.lanes);
        if lanes == 0 || lanes > self.most_lanes {
            return Err(format!(
                "tunnel {tunnel} has {lanes} streams; the plan allows 1 to {}",
                self.most_lanes
            ));
        }
        if lane >= lanes {
            return Err(format!("stream {lane} of tunnel {tunnel}, which has {lanes} streams"));
        }
        let partial = match self.partial.get_mut(&tunnel) {
            Some(p) => p,
            None => {
                if self.seen.contains(&tunnel) {
                    return Err(format!(
                        "tunnel {tunnel} was opened already: each tunnel has its own number"
                    ));
                }
                if self.seen.len() as u64 >= u64::from(self.most_tunnels) {
                    return Err(format!("more than {} tunnels in one live migration", self.most_tunnels));
                }
                self.seen.insert(tunnel);
                self.partial.entry(tunnel).or_insert(Partial {
                    kind: header.kind,
                    lanes: (0..lanes).map(|_| None).collect(),
                    missing: usize::from(lanes),
                })
            }
        };
        if partial.kind != header.kind || partial.lanes.len() != usize::from(lanes) {
            return Err(format!(
                "the streams of tunnel {tunnel} disagree on its kind or its number of streams"
            ));
        }
        let slot = &mut partial.lanes[usize::from(lane)];
        if slot.is_some() {
            return Err(format!("stream {lane} of tunnel {tunnel} was opened twice"));
        }
        *slot = Some(stream);
        partial.missing -= 1;
        if partial.missing > 0 {
            return Ok(None);
        }
        let done = self
            .partial
            .remove(&tunnel)
            .map(|p| p.lanes.into_iter().flatten().collect());
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tunnel: u32, lane: u16, lanes: u16, kind: TunnelKind) -> TunnelHeader {
        TunnelHeader {
            migration_id: "m".into(),
            kind,
            tunnel,
            lane,
            lanes,
        }
    }

    #[test]
    fn a_tunnel_connects_when_its_last_lane_arrives_in_lane_order() {
        let mut l = Lanes::new(4, 8);
        assert_eq!(l.add(&header(0, 2, 3, TunnelKind::Memory), "c"), Ok(None));
        assert_eq!(l.add(&header(1, 0, 1, TunnelKind::Nbd), "nbd"), Ok(Some(vec!["nbd"])));
        assert_eq!(l.add(&header(0, 0, 3, TunnelKind::Memory), "a"), Ok(None));
        assert_eq!(
            l.add(&header(0, 1, 3, TunnelKind::Memory), "b"),
            Ok(Some(vec!["a", "b", "c"]))
        );
    }

    #[test]
    fn lanes_that_break_the_rules_are_refused() {
        let mut l = Lanes::new(4, 2);
        let e = l.add(&header(0, 0, 5, TunnelKind::Memory), ()).unwrap_err();
        assert!(e.contains("the plan allows 1 to 4"), "{e}");
        assert!(l.add(&header(0, 0, 0, TunnelKind::Memory), ()).is_err());
        assert!(l.add(&header(0, 3, 3, TunnelKind::Memory), ()).is_err());
        assert_eq!(l.add(&header(0, 0, 2, TunnelKind::Memory), ()), Ok(None));
        let e = l.add(&header(0, 0, 2, TunnelKind::Memory), ()).unwrap_err();
        assert!(e.contains("opened twice"), "{e}");
        assert!(l.add(&header(0, 1, 2, TunnelKind::Nbd), ()).is_err());
        assert!(l.add(&header(0, 1, 3, TunnelKind::Memory), ()).is_err());
        assert_eq!(l.add(&header(0, 1, 2, TunnelKind::Memory), ()), Ok(Some(vec![(), ()])));
        // A finished tunnel's number is not reused, and the count is bounded.
        assert!(l
            .add(&header(0, 0, 1, TunnelKind::Nbd), ())
            .unwrap_err()
            .contains("opened already"));
        assert_eq!(l.add(&header(1, 0, 1, TunnelKind::Nbd), ()), Ok(Some(vec![()])));
        assert!(l
            .add(&header(2, 0, 1, TunnelKind::Nbd), ())
            .unwrap_err()
            .contains("more than 2 tunnels"));
    }
}
