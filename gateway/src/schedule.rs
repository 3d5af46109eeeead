//! When a scheduled switchover runs: at a time (`--switchover-at`), inside a daily window
//! (`--switchover-window 02:00-04:00`), or both. No clock here: the time is passed in
//! (Unix seconds, UTC), so the rules are tested without waiting.
//!
//! A window repeats every day, in UTC (the edge and the cloud may sit in different time
//! zones; UTC is the one they share). `22:00-02:00` crosses midnight. A switchover never
//! starts outside its window: one whose time falls outside waits for the window's next
//! opening, and one whose pass ended after the window closed (a late or slow sync) waits
//! for the next day's.

use std::fmt;

use serde::{Deserialize, Serialize};

const DAY: i64 = 24 * 60 * 60;
const MINUTES_PER_DAY: u16 = 24 * 60;

/// A daily window `[start, end)` in minutes after midnight UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverWindow {
    start_min: u16,
    end_min: u16,
}

impl SwitchoverWindow {
    /// A window from `start_min` to `end_min` (minutes after midnight UTC, each below
    /// 1440); an end before the start crosses midnight. An empty window (start = end)
    /// would never open, so it is refused.
    pub fn new(start_min: u16, end_min: u16) -> Result<Self, String> {
        if start_min >= MINUTES_PER_DAY || end_min >= MINUTES_PER_DAY {
            return Err(format!(
                "a window's times are between 00:00 and 23:59, not {} and {}",
                hhmm(start_min),
                hhmm(end_min)
            ));
        }
        if start_min == end_min {
            return Err(format!(
                "the window {0}-{0} is empty: give an end after the start (or before it, to cross midnight)",
                hhmm(start_min)
            ));
        }
        Ok(SwitchoverWindow { start_min, end_min })
    }

    /// Seconds after midnight UTC at which the window opens and how long it lasts.
    fn span(&self) -> (i64, i64) {
        let start = i64::from(self.start_min) * 60;
        let len = (i64::from(self.end_min) - i64::from(self.start_min)).rem_euclid(i64::from(MINUTES_PER_DAY)) * 60;
        (start, len)
    }

    /// Whether the window is open at `t` (Unix seconds).
    pub fn contains(&self, t: i64) -> bool {
        let (start, len) = self.span();
        (t - start).rem_euclid(DAY) < len
    }

    /// `t` if the window is open then, else when it next opens.
    pub fn next_open(&self, t: i64) -> i64 {
        if self.contains(t) {
            return t;
        }
        let (start, _) = self.span();
        t + (start - t).rem_euclid(DAY)
    }

    /// When the window open at `t` closes (`t` itself if it is not open).
    pub fn closes(&self, t: i64) -> i64 {
        if !self.contains(t) {
            return t;
        }
        let (start, len) = self.span();
        t - (t - start).rem_euclid(DAY) + len
    }
}

fn hhmm(min: u16) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

impl fmt::Display for SwitchoverWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", hhmm(self.start_min), hhmm(self.end_min))
    }
}

impl std::str::FromStr for SwitchoverWindow {
    type Err = String;

    /// `HH:MM-HH:MM` (or `HH:MM..HH:MM`), UTC, e.g. `02:00-04:00` or `22:30-01:00`.
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || format!("{text:?} is not a window like 02:00-04:00 (HH:MM-HH:MM, UTC, daily)");
        let (start, end) = text
            .split_once("..")
            .or_else(|| text.split_once('-'))
            .ok_or_else(usage)?;
        let minutes = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(usage)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| usage())?, m.parse().map_err(|_| usage())?);
            if h >= 24 || m >= 60 || t.trim().len() != 5 {
                return Err(usage());
            }
            Ok(h * 60 + m)
        };
        SwitchoverWindow::new(minutes(start)?, minutes(end)?)
    }
}

/// What a replication should do about its switchover at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverDue {
    /// No switchover is scheduled.
    NotScheduled,
    /// Switch over now.
    Now,
    /// Wait until `at` (Unix seconds). `missed_window`: the switchover was due earlier
    /// but its window closed before it could start (the sync ran late), so it waits for
    /// the window's next opening.
    At { at: i64, missed_window: bool },
}

/// When the switchover scheduled at `at` and/or inside `window` runs, seen at `now`. A
/// window alone means: at its next opening. A time outside the window means: at the
/// window's first opening after that time.
pub fn switchover_due(at: Option<i64>, window: Option<SwitchoverWindow>, now: i64) -> SwitchoverDue {
    match (at, window) {
        (None, None) => SwitchoverDue::NotScheduled,
        (Some(at), None) if at <= now => SwitchoverDue::Now,
        (Some(at), None) => SwitchoverDue::At {
            at,
            missed_window: false,
        },
        (at, Some(w)) => {
            let first = w.next_open(at.unwrap_or(now));
            if now < first {
                SwitchoverDue::At {
                    at: first,
                    missed_window: false,
                }
            } else if w.contains(now) {
                SwitchoverDue::Now
            } else {
                SwitchoverDue::At {
                    at: w.next_open(now),
                    missed_window: true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-07T00:00:00Z.
    const MIDNIGHT: i64 = 1_796_601_600;
    const H: i64 = 3600;

    fn w(text: &str) -> SwitchoverWindow {
        text.parse().unwrap()
    }

    #[test]
    fn windows_parse_print_and_refuse_what_is_not_a_window() {
        assert_eq!(w("02:00-04:00").to_string(), "02:00-04:00");
        assert_eq!(w("22:30..01:15").to_string(), "22:30-01:15");
        for bad in [
            "",
            "2-4",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "02:00-02:00",
            "2:00-04:00",
            "a:00-04:00",
        ] {
            assert!(bad.parse::<SwitchoverWindow>().is_err(), "{bad:?} accepted");
        }
        assert!("02:00-02:00".parse::<SwitchoverWindow>().unwrap_err().contains("empty"));
    }

    #[test]
    fn a_window_is_open_every_day_and_may_cross_midnight() {
        let night = w("02:00-04:00");
        for day in [0, 1, 40] {
            let d = MIDNIGHT + day * DAY;
            assert!(!night.contains(d + 2 * H - 1));
            assert!(night.contains(d + 2 * H));
            assert!(night.contains(d + 4 * H - 1));
            assert!(!night.contains(d + 4 * H), "the end is not in the window");
            assert_eq!(night.next_open(d + 5 * H), d + DAY + 2 * H);
            assert_eq!(night.next_open(d + H), d + 2 * H);
            assert_eq!(night.closes(d + 3 * H), d + 4 * H);
        }
        let late = w("22:00-01:00");
        assert!(late.contains(MIDNIGHT + 23 * H) && late.contains(MIDNIGHT + DAY + 30 * 60));
        assert!(!late.contains(MIDNIGHT + H) && !late.contains(MIDNIGHT + 21 * H));
        assert_eq!(late.closes(MIDNIGHT + 23 * H), MIDNIGHT + DAY + H);
        assert_eq!(late.next_open(MIDNIGHT + 12 * H), MIDNIGHT + 22 * H);
        // Before 1970 too (rem_euclid, not %).
        assert!(late.contains(-H));
    }

    #[test]
    fn a_time_and_a_window_decide_together_and_a_missed_window_waits_for_the_next_day() {
        use SwitchoverDue::*;
        let night = Some(w("02:00-04:00"));
        let now = MIDNIGHT + H; // 01:00
        assert_eq!(switchover_due(None, None, now), NotScheduled);
        assert_eq!(switchover_due(Some(now - 5), None, now), Now);
        assert_eq!(
            switchover_due(Some(now + 5), None, now),
            At {
                at: now + 5,
                missed_window: false
            }
        );
        // A window alone: its next opening.
        let open = MIDNIGHT + 2 * H;
        assert_eq!(
            switchover_due(None, night, now),
            At {
                at: open,
                missed_window: false
            }
        );
        assert_eq!(switchover_due(None, night, open + 60), Now);
        // A time inside the window: that time; outside: the next opening after it.
        assert_eq!(switchover_due(Some(open + H), night, open + H), Now);
        assert_eq!(
            switchover_due(Some(open + H), night, open),
            At {
                at: open + H,
                missed_window: false
            }
        );
        assert_eq!(
            switchover_due(Some(MIDNIGHT + 5 * H), night, now),
            At {
                at: MIDNIGHT + DAY + 2 * H,
                missed_window: false
            }
        );
        // Due at 02:30, but the pass ended at 04:10: the window closed; tomorrow's.
        assert_eq!(
            switchover_due(Some(open + 30 * 60), night, MIDNIGHT + 4 * H + 600),
            At {
                at: MIDNIGHT + DAY + 2 * H,
                missed_window: true
            }
        );
        // ...and runs at once inside it.
        assert_eq!(
            switchover_due(Some(open + 30 * 60), night, MIDNIGHT + DAY + 2 * H + 1),
            Now
        );
    }
}
