//! In-order reassembly of one direction of a tunnel striped over several QUIC streams
//! ("lanes"), with no I/O: the driver in [`super`] feeds it the frames each lane
//! delivers and takes back the ones that are next in order.
//!
//! The protocol rule it checks (protocol version 10): frame `s` of a tunnel direction
//! travels on lane `s % lanes`, so each lane carries frames `lane, lane + lanes,
//! lane + 2·lanes, ...` in that order. A QUIC stream is itself in order, so the only
//! reordering is between lanes, and a receiver that reads a lane's next frame only once
//! its previous one was delivered holds at most one frame per lane: the reorder buffer
//! is bounded by `lanes` frames (`lanes` × [`super::MAX_PLAIN`] bytes of plaintext,
//! 8 MiB at [`crate::wire::live::MAX_TUNNEL_LANES`]), whatever the peer sends. Anything
//! else from the peer (a duplicate, a skipped frame, a frame beyond the window, a lane
//! that ends while its frame is still missing) is a protocol violation: the stream
//! cannot be repaired, so the tunnel is refused rather than stalled.

/// What a peer did wrong on a striped tunnel. Each is a protocol violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReorderError {
    #[error("tunnel frame {seq} arrived on stream {lane} of {lanes}, which does not exist")]
    NoSuchLane { lane: usize, lanes: usize, seq: u64 },
    #[error("tunnel frame {seq} arrived twice (stream {lane} was at frame {expected}): the peer duplicated a frame")]
    Duplicate { seq: u64, lane: usize, expected: u64 },
    #[error(
        "tunnel frame {seq} arrived while frame {next} is still missing, beyond the reorder window of {window} \
         frames: the peer ran ahead of what the receiver holds"
    )]
    BeyondWindow { seq: u64, next: u64, window: u64 },
    #[error(
        "tunnel frame {seq} arrived on stream {lane} where frame {expected} was due: frames travel round-robin, \
         frame N on stream N mod {lanes}"
    )]
    WrongLane {
        seq: u64,
        lane: usize,
        lanes: usize,
        expected: u64,
    },
    #[error("stream {lane} ended with tunnel frame {missing} missing while later frames arrived: the peer ended one stream early")]
    EndedEarly { lane: usize, missing: u64 },
    #[error("tunnel frame {seq} arrived on stream {lane} after the peer ended it")]
    AfterEnd { lane: usize, seq: u64 },
}

/// The reorder buffer of one tunnel direction; `T` is a frame's plaintext.
#[derive(Debug)]
pub struct Reorder<T> {
    /// The next frame to deliver.
    next: u64,
    /// Per lane: the frame it delivered and that waits for its turn (at most one).
    held: Vec<Option<(u64, T)>>,
    /// Per lane: the frame it must carry next.
    due: Vec<u64>,
    /// Per lane: the peer finished it.
    ended: Vec<bool>,
}

impl<T> Reorder<T> {
    /// A buffer for `lanes` lanes (at least 1).
    pub fn new(lanes: usize) -> Self {
        let lanes = lanes.max(1);
        Reorder {
            next: 0,
            held: (0..lanes).map(|_| None).collect(),
            due: (0..lanes as u64).collect(),
            ended: vec![false; lanes],
        }
    }

    fn lanes(&self) -> usize {
        self.held.len()
    }

    /// Whether `lane` may read its next frame: it holds none. The driver must not read a
    /// lane otherwise; that is what bounds the buffer.
    pub fn may_read(&self, lane: usize) -> bool {
        self.held.get(lane).is_some_and(Option::is_none)
    }

    /// Frames held, waiting for an earlier one.
    pub fn held(&self) -> usize {
        self.held.iter().filter(|h| h.is_some()).count()
    }

    /// Frame `seq` arrived on `lane`.
    pub fn accept(&mut self, lane: usize, seq: u64, frame: T) -> Result<(), ReorderError> {
        let lanes = self.lanes();
        if lane >= lanes {
            return Err(ReorderError::NoSuchLane { lane, lanes, seq });
        }
        if self.ended[lane] {
            return Err(ReorderError::AfterEnd { lane, seq });
        }
        let expected = self.due[lane];
        // Received already, on its own lane (which carries its frames in order): a
        // duplicate, whichever lane it came on again. A frame not seen yet that arrives
        // on another lane is the wrong lane, not a duplicate, even if it is below this
        // lane's next frame.
        let own = (seq % lanes as u64) as usize;
        if seq < self.due[own] {
            return Err(ReorderError::Duplicate { seq, lane, expected });
        }
        let window = lanes as u64;
        if seq >= self.next.saturating_add(window) {
            return Err(ReorderError::BeyondWindow {
                seq,
                next: self.next,
                window,
            });
        }
        if seq != expected {
            return Err(ReorderError::WrongLane {
                seq,
                lane,
                lanes,
                expected,
            });
        }
        // The window implies one frame per lane: a lane's next frame is `lanes` past the
        // one it holds, so at least `next + lanes`.
        debug_assert!(self.held[lane].is_none());
        // A lane the peer ended owes nothing after its last frame: a later frame on
        // another lane means one is missing for good.
        if let Some(missing) = self.missing_before(seq) {
            return Err(ReorderError::EndedEarly {
                lane: (missing % window) as usize,
                missing,
            });
        }
        self.due[lane] = seq + window;
        self.held[lane] = Some((seq, frame));
        Ok(())
    }

    /// The first frame below `seq` that an ended lane still owes.
    fn missing_before(&self, seq: u64) -> Option<u64> {
        (0..self.lanes())
            .filter(|&l| self.ended[l] && self.due[l] < seq)
            .map(|l| self.due[l])
            .min()
    }

    /// The next frame in order, if it is here, and the lane it came on (which may now
    /// read again).
    pub fn pop(&mut self) -> Option<(usize, T)> {
        let lane = (self.next % self.lanes() as u64) as usize;
        match self.held[lane].take() {
            Some((seq, frame)) if seq == self.next => {
                self.next += 1;
                Some((lane, frame))
            }
            other => {
                self.held[lane] = other;
                None
            }
        }
    }

    /// The peer finished `lane`.
    pub fn end(&mut self, lane: usize) -> Result<(), ReorderError> {
        let Some(ended) = self.ended.get_mut(lane) else {
            return Err(ReorderError::NoSuchLane {
                lane,
                lanes: self.lanes(),
                seq: 0,
            });
        };
        *ended = true;
        let owed = self.due[lane];
        match self.held.iter().flatten().any(|(seq, _)| *seq > owed) {
            true => Err(ReorderError::EndedEarly { lane, missing: owed }),
            false => Ok(()),
        }
    }

    /// Every lane ended and every frame was delivered: this direction is complete.
    pub fn is_finished(&self) -> bool {
        self.ended.iter().all(|e| *e) && self.held() == 0
    }

    /// Frames delivered so far.
    pub fn delivered(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &mut Reorder<u64>) -> Vec<u64> {
        std::iter::from_fn(|| r.pop().map(|(_, f)| f)).collect()
    }

    #[test]
    fn in_order_frames_pass_straight_through() {
        let mut r = Reorder::new(3);
        for seq in 0..9 {
            r.accept((seq % 3) as usize, seq, seq).unwrap();
            assert_eq!(drain(&mut r), vec![seq]);
        }
        for lane in 0..3 {
            r.end(lane).unwrap();
        }
        assert!(r.is_finished());
        assert_eq!(r.delivered(), 9);
    }

    #[test]
    fn out_of_order_lanes_are_held_then_delivered_in_order() {
        let mut r = Reorder::new(4);
        // Lanes 1..3 overtake lane 0 (its packet was lost and resent).
        for seq in [3, 1, 2] {
            r.accept(seq as usize, seq, seq).unwrap();
            assert_eq!(drain(&mut r), Vec::<u64>::new());
        }
        assert_eq!(r.held(), 3);
        assert!(!r.may_read(1) && r.may_read(0));
        r.accept(0, 0, 0).unwrap();
        assert_eq!(drain(&mut r), vec![0, 1, 2, 3]);
        assert_eq!(r.held(), 0);
        assert!((0..4).all(|l| r.may_read(l)));
        // Every lane may run ahead by its one frame again.
        r.accept(2, 6, 6).unwrap();
        r.accept(0, 4, 4).unwrap();
        assert_eq!(drain(&mut r), vec![4]);
        r.accept(1, 5, 5).unwrap();
        assert_eq!(drain(&mut r), vec![5, 6]);
    }

    #[test]
    fn a_single_lane_is_the_old_one_stream_tunnel() {
        let mut r = Reorder::new(1);
        for seq in 0..5 {
            r.accept(0, seq, seq).unwrap();
            assert_eq!(r.pop(), Some((0, seq)));
        }
        assert!(matches!(
            r.accept(0, 7, 7),
            Err(ReorderError::BeyondWindow {
                seq: 7,
                next: 5,
                window: 1
            })
        ));
    }

    #[test]
    fn duplicates_are_violations() {
        let mut r = Reorder::new(2);
        r.accept(0, 0, 0).unwrap();
        assert_eq!(drain(&mut r), vec![0]);
        // Delivered already.
        let e = r.accept(0, 0, 0).unwrap_err();
        assert_eq!(
            e,
            ReorderError::Duplicate {
                seq: 0,
                lane: 0,
                expected: 2
            }
        );
        assert!(e.to_string().contains("arrived twice"), "{e}");
        // Held, not yet delivered, sent again on its lane.
        let mut r = Reorder::new(2);
        r.accept(1, 1, 1).unwrap();
        assert!(matches!(r.accept(1, 1, 1), Err(ReorderError::Duplicate { seq: 1, .. })));
    }

    #[test]
    fn a_gap_beyond_the_window_is_refused_before_it_is_held() {
        let mut r = Reorder::new(4);
        let e = r.accept(0, 4, 4).unwrap_err();
        assert_eq!(
            e,
            ReorderError::BeyondWindow {
                seq: 4,
                next: 0,
                window: 4
            }
        );
        assert!(e.to_string().contains("reorder window of 4"), "{e}");
        assert_eq!(r.held(), 0);
        // A far-future sequence number does not overflow the window check.
        assert!(matches!(
            r.accept(1, u64::MAX, 0),
            Err(ReorderError::BeyondWindow { .. })
        ));
        // Frame 0, not seen yet, on lane 1 (whose next is 1): the wrong lane, not a
        // duplicate.
        assert!(matches!(
            r.accept(1, 0, 0),
            Err(ReorderError::WrongLane {
                seq: 0,
                lane: 1,
                expected: 1,
                ..
            })
        ));
        // Within the window, but on the wrong lane.
        assert!(matches!(
            r.accept(1, 2, 2),
            Err(ReorderError::WrongLane {
                seq: 2,
                lane: 1,
                expected: 1,
                ..
            })
        ));
        assert!(matches!(r.accept(9, 2, 2), Err(ReorderError::NoSuchLane { .. })));
    }

    #[test]
    fn the_buffer_never_holds_more_than_one_frame_per_lane() {
        let lanes = 8;
        let mut r = Reorder::new(lanes);
        // Every lane but 0 delivers; lane 0 stalls. Whatever comes next is refused.
        for seq in 1..lanes as u64 {
            r.accept(seq as usize, seq, seq).unwrap();
        }
        assert_eq!(r.held(), lanes - 1);
        for lane in 1..lanes {
            assert!(r.accept(lane, lane as u64 + lanes as u64, 0).is_err());
        }
        assert_eq!(r.held(), lanes - 1);
        r.accept(0, 0, 0).unwrap();
        assert_eq!(drain(&mut r).len(), lanes);
    }

    #[test]
    fn a_peer_closing_one_stream_early_is_caught() {
        // Lane 1 ends while frame 3 (its next) is owed and frame 4 is held already.
        let mut r = Reorder::new(2);
        for seq in 0..3 {
            r.accept((seq % 2) as usize, seq, seq).unwrap();
            drain(&mut r);
        }
        r.accept(0, 4, 4).unwrap();
        assert_eq!(r.end(1), Err(ReorderError::EndedEarly { lane: 1, missing: 3 }));

        // Lane 1 ends first; a later frame on lane 0 proves frame 3 will never come.
        let mut r = Reorder::new(2);
        for seq in 0..3 {
            r.accept((seq % 2) as usize, seq, seq).unwrap();
            drain(&mut r);
        }
        r.end(1).unwrap();
        let e = r.accept(0, 4, 4).unwrap_err();
        assert_eq!(e, ReorderError::EndedEarly { lane: 1, missing: 3 });
        assert!(e.to_string().contains("ended one stream early"), "{e}");
        assert!(matches!(r.accept(1, 3, 3), Err(ReorderError::AfterEnd { .. })));

        // Ending lanes at the stream's end in any order is a clean end.
        let mut r = Reorder::new(3);
        for seq in 0..4 {
            r.accept((seq % 3) as usize, seq, seq).unwrap();
            assert_eq!(drain(&mut r), vec![seq]);
        }
        for lane in [2, 0, 1] {
            assert!(!r.is_finished());
            r.end(lane).unwrap();
        }
        assert!(r.is_finished());
    }
}
