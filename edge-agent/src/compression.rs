//! How hard to compress. On a LAN the cores are the bottleneck and zstd's
//! fastest level wins; on a 100 Mbit/s WAN link two cores compress far faster
//! than the link drains, so a higher level turns idle CPU into logical rate
//! (bytes of disk moved per second = link rate x compression ratio).
//!
//! [`LevelController`] finds the crossover from the pipeline's own pressure,
//! without a model of the CPU or the link: sealers waiting for queue room
//! means the network is the bottleneck (compress harder); stream senders
//! waiting for sealed chunks means the CPU is (compress lighter).

use std::str::FromStr;

use gateway::chunk::DEFAULT_ZSTD_LEVEL;

/// Highest level the adaptive mode uses. Past 12 zstd switches to its
/// optimal parsers, an order of magnitude slower per byte for a few percent
/// of ratio: not worth a chunk's latency on any link two cores can fill.
pub const MAX_AUTO_LEVEL: i32 = 12;

/// The zstd level of a migration: fixed, or following the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Fixed(i32),
    /// Starts at `min` and moves between `min` and `max` with the pressure.
    Adaptive {
        min: i32,
        max: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Adaptive {
            min: DEFAULT_ZSTD_LEVEL,
            max: MAX_AUTO_LEVEL,
        }
    }
}

impl Compression {
    pub fn initial_level(self) -> i32 {
        match self {
            Compression::Fixed(l) => l,
            Compression::Adaptive { min, .. } => min,
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `auto`, `auto:MIN-MAX`, or a level from -7 to 19.
    fn from_str(s: &str) -> Result<Self, String> {
        let level = |t: &str| -> Result<i32, String> {
            match t.trim().parse::<i32>() {
                Ok(l) if (-7..=19).contains(&l) => Ok(l),
                _ => Err(format!(
                    "`{s}` is not a zstd level: use auto, auto:MIN-MAX, or a number from -7 to 19"
                )),
            }
        };
        if s == "auto" {
            return Ok(Compression::default());
        }
        if let Some(range) = s.strip_prefix("auto:") {
            // Split at the dash that separates the bounds, not a minus sign.
            let (lo, hi) = range
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == '-')
                .map(|(i, _)| (&range[..i], &range[i + 1..]))
                .ok_or_else(|| format!("`{s}`: write the range as auto:MIN-MAX, e.g. auto:1-9"))?;
            let (min, max) = (level(lo)?, level(hi)?);
            if min > max {
                return Err(format!("`{s}`: the lowest level comes first, e.g. auto:1-9"));
            }
            return Ok(Compression::Adaptive { min, max });
        }
        Ok(Compression::Fixed(level(s)?))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Fixed(l) => write!(f, "{l}"),
            Compression::Adaptive { min, max } => write!(f, "auto:{min}-{max}"),
        }
    }
}

/// Share of a sampling window the pipeline's stages spent waiting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// Sealers waiting for room in the queue of sealed chunks: the network
    /// takes less than the CPU makes.
    pub sealers_blocked: f64,
    /// A stream sender waiting for a sealed chunk: the network could take more. Share
    /// of wall time in which at least one waited, so it does not depend on how many
    /// streams there are.
    pub senders_starved: f64,
}

/// Moves the level one step per sampling window, with a dead band so it
/// settles instead of hunting.
#[derive(Debug, Clone)]
pub struct LevelController {
    mode: Compression,
    level: i32,
    lowest: i32,
    highest: i32,
}

impl LevelController {
    pub fn new(mode: Compression) -> Self {
        let level = mode.initial_level();
        LevelController {
            mode,
            level,
            lowest: level,
            highest: level,
        }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// The range of levels used so far.
    pub fn range(&self) -> (i32, i32) {
        (self.lowest, self.highest)
    }

    /// Feeds one window's pressure; returns the level for the next chunks.
    pub fn update(&mut self, p: Pressure) -> i32 {
        let Compression::Adaptive { min, max } = self.mode else {
            return self.level;
        };
        if p.senders_starved > 0.20 {
            // The link waits on compression: it is the scarcer resource.
            self.level = (self.level - 1).max(min);
        } else if p.sealers_blocked > 0.50 && p.senders_starved < 0.05 {
            self.level = (self.level + 1).min(max);
        }
        self.lowest = self.lowest.min(self.level);
        self.highest = self.highest.max(self.level);
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETWORK_BOUND: Pressure = Pressure {
        sealers_blocked: 0.9,
        senders_starved: 0.0,
    };
    const CPU_BOUND: Pressure = Pressure {
        sealers_blocked: 0.0,
        senders_starved: 0.6,
    };
    const BALANCED: Pressure = Pressure {
        sealers_blocked: 0.3,
        senders_starved: 0.1,
    };

    #[test]
    fn levels_parse() {
        assert_eq!(
            "auto".parse(),
            Ok(Compression::Adaptive {
                min: 1,
                max: MAX_AUTO_LEVEL
            })
        );
        assert_eq!("auto:3-9".parse(), Ok(Compression::Adaptive { min: 3, max: 9 }));
        assert_eq!("auto:-3-5".parse(), Ok(Compression::Adaptive { min: -3, max: 5 }));
        assert_eq!("-5".parse(), Ok(Compression::Fixed(-5)));
        assert_eq!("19".parse(), Ok(Compression::Fixed(19)));
        for bad in ["20", "fast", "auto:9-3", "auto:3", "auto:1-30"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        assert_eq!(Compression::Adaptive { min: 1, max: 12 }.to_string(), "auto:1-12");
    }

    #[test]
    fn a_slow_link_raises_the_level_up_to_the_bound() {
        let mut c = LevelController::new(Compression::Adaptive { min: 1, max: 4 });
        let levels: Vec<i32> = (0..5).map(|_| c.update(NETWORK_BOUND)).collect();
        assert_eq!(levels, [2, 3, 4, 4, 4]);
        assert_eq!(c.range(), (1, 4));
    }

    #[test]
    fn starved_senders_lower_it_and_balance_holds_it() {
        let mut c = LevelController::new(Compression::Adaptive { min: 1, max: 12 });
        for _ in 0..6 {
            c.update(NETWORK_BOUND);
        }
        assert_eq!(c.level(), 7);
        assert_eq!(c.update(CPU_BOUND), 6);
        assert_eq!(c.update(BALANCED), 6);
        assert_eq!(c.update(BALANCED), 6);
        for _ in 0..10 {
            c.update(CPU_BOUND);
        }
        assert_eq!(c.level(), 1, "never below the minimum");
    }

    #[test]
    fn a_fixed_level_never_moves() {
        let mut c = LevelController::new(Compression::Fixed(3));
        assert_eq!(c.update(NETWORK_BOUND), 3);
        assert_eq!(c.update(CPU_BOUND), 3);
    }
}
