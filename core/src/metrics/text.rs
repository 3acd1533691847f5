//! Writing the Prometheus text exposition format, and the lock-free histogram the
//! binaries' metrics share.
//!
//! Every family is written with its `# HELP` and `# TYPE` lines first and then its
//! samples, as `promtool check metrics` wants; label values are escaped.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A scrape being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its help text and type. Its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value);
    }

    /// A family of one unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// The samples of one histogram series (`_bucket`, `_sum`, `_count`) of the
    /// current family.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0;
        for (bound, bucket) in histogram.bounds.iter().zip(histogram.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&format_bound(*bound)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let count = histogram.count();
        let _ = write!(self.out, "{name}_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", histogram.sum());
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {count}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            let _ = write!(self.out, "{key}=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// The text, ready to serve.
    pub fn finish(self) -> String {
        self.out
    }
}

fn format_bound(bound: f64) -> String {
    // `{}` of an f64 never uses an exponent and drops a trailing `.0`: 0.0001, 5.
    format!("{bound}")
}

/// Bucket bounds (seconds) for latencies from 100 µs to 10 s.
pub const LATENCY_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds for counts of things handled at once (batch sizes).
pub const BATCH_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A histogram of fixed buckets, updated with relaxed atomics: one bucket, the
/// count and the sum per observation, no lock.
///
/// Values are recorded as integers of a unit (microseconds for latencies, 1 for
/// counts), so the sum is exact and the bucket search compares integers.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// The bounds in units, for the search.
    unit_bounds: Box<[u64]>,
    /// Observations per bucket (not cumulative; the exposition adds them up).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_units: AtomicU64,
    /// The value of one unit in the exposed base unit.
    unit: f64,
}

impl Histogram {
    /// A histogram of `bounds` (in the exposed base unit) recording integers of `unit`.
    pub fn new(bounds: &'static [f64], unit: f64) -> Self {
        Self {
            bounds,
            unit_bounds: bounds.iter().map(|b| (b / unit).round() as u64).collect(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_units: AtomicU64::new(0),
            unit,
        }
    }

    /// A latency histogram in seconds, recording microseconds.
    pub fn latency() -> Self {
        Self::new(LATENCY_SECONDS, 1e-6)
    }

    /// A histogram of batch sizes.
    pub fn batch_sizes() -> Self {
        Self::new(BATCH_SIZES, 1.0)
    }

    /// Records a value of `units`.
    pub fn observe(&self, units: u64) {
        let index = self.unit_bounds.partition_point(|&bound| bound < units);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_units.fetch_add(units, Ordering::Relaxed);
    }

    /// Records a duration (for a histogram of microseconds).
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of what was observed, in the exposed base unit.
    pub fn sum(&self) -> f64 {
        self.sum_units.load(Ordering::Relaxed) as f64 * self.unit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let h = Histogram::latency();
        h.observe_duration(Duration::from_micros(50));
        h.observe_duration(Duration::from_micros(100));
        h.observe_duration(Duration::from_millis(3));
        h.observe_duration(Duration::from_secs(60));
        let mut out = Exposition::new();
        out.family("x_seconds", Kind::Histogram, "test");
        out.histogram("x_seconds", &[("method", "A\"b")], &h);
        let text = out.finish();
        assert!(text.contains("x_seconds_bucket{method=\"A\\\"b\",le=\"0.0001\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{method=\"A\\\"b\",le=\"0.005\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{method=\"A\\\"b\",le=\"10\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{method=\"A\\\"b\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("x_seconds_count{method=\"A\\\"b\"} 4\n"));
        assert!(text.contains("x_seconds_sum{method=\"A\\\"b\"} 60.00315"));
    }

    #[test]
    fn batch_sizes_count_whole_items() {
        let h = Histogram::batch_sizes();
        h.observe(1);
        h.observe(3);
        h.observe(1000);
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum(), 1004.0);
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[2].load(Ordering::Relaxed), 1);
    }
}
