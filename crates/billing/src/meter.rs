//! Metering one execution: measured times → billed milliseconds and MB·milliseconds.
//!
//! The pool measures durations as floating-point milliseconds; [`micros`] is the one
//! place a float becomes an integer (rounded to the nearest microsecond). From there on
//! everything is integer or exact decimal arithmetic.

/// What one execution is billed for, in integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metered {
    /// Run duration rounded UP to the granularity.
    pub billed_ms: i64,
    /// Cold-start init duration rounded UP to the granularity (0 when warm).
    pub init_billed_ms: i64,
    /// `billed_ms × memory_mb`.
    pub mb_ms: i64,
    /// `init_billed_ms × memory_mb`.
    pub init_mb_ms: i64,
}

/// A measured duration in milliseconds as whole microseconds (nearest; negative or
/// non-finite values count as 0).
pub fn micros(ms: f64) -> i64 {
    if ms.is_finite() && ms > 0.0 {
        // Saturating: no run lasts 292 000 years.
        (ms * 1000.0).round() as i64
    } else {
        0
    }
}

/// `micros` rounded UP to a whole multiple of `granularity_ms`, in milliseconds. A run
/// of 0 µs bills 0; any positive run bills at least one granule.
pub fn round_up_ms(micros: i64, granularity_ms: u32) -> i64 {
    let granule = i64::from(granularity_ms.max(1)) * 1000;
    let micros = micros.max(0);
    let granules = micros / granule + i64::from(micros % granule != 0);
    granules * i64::from(granularity_ms.max(1))
}

/// Meters one execution that ran `duration_ms` (plus `init_ms` of cold start) with
/// `memory_mb` configured.
pub fn meter(
    duration_ms: f64,
    init_ms: Option<f64>,
    memory_mb: u32,
    granularity_ms: u32,
) -> Metered {
    let billed_ms = round_up_ms(micros(duration_ms), granularity_ms);
    let init_billed_ms = init_ms.map_or(0, |i| round_up_ms(micros(i), granularity_ms));
    let memory = i64::from(memory_mb);
    Metered {
        billed_ms,
        init_billed_ms,
        mb_ms: billed_ms.saturating_mul(memory),
        init_mb_ms: init_billed_ms.saturating_mul(memory),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_the_granularity() {
        assert_eq!(round_up_ms(0, 1), 0);
        assert_eq!(round_up_ms(1, 1), 1, "1 µs bills 1 ms");
        assert_eq!(round_up_ms(1000, 1), 1);
        assert_eq!(round_up_ms(1001, 1), 2);
        assert_eq!(round_up_ms(99_999, 100), 100);
        assert_eq!(round_up_ms(100_000, 100), 100);
        assert_eq!(round_up_ms(100_001, 100), 200);
    }

    #[test]
    fn floats_become_nearest_microseconds() {
        assert_eq!(micros(0.4), 400);
        assert_eq!(micros(12.3456), 12_346);
        assert_eq!(micros(-1.0), 0);
        assert_eq!(micros(f64::NAN), 0);
    }

    #[test]
    fn meters_memory_times_billed_time() {
        // 0.4 ms warm run at 128 MB, 1 ms granularity: 1 ms × 128 MB.
        assert_eq!(
            meter(0.4, None, 128, 1),
            Metered {
                billed_ms: 1,
                init_billed_ms: 0,
                mb_ms: 128,
                init_mb_ms: 0
            }
        );
        // 250.2 ms run + 57.1 ms init at 512 MB, 100 ms granularity.
        assert_eq!(
            meter(250.2, Some(57.1), 512, 100),
            Metered {
                billed_ms: 300,
                init_billed_ms: 100,
                mb_ms: 153_600,
                init_mb_ms: 51_200
            }
        );
    }
}
