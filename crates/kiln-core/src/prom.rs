//! The little of the Prometheus text format (0.0.4) kiln writes: a family's header and a
//! cumulative histogram. No I/O: callers render into a `String` at scrape time.

use std::fmt::Write;

/// A metric family's `# HELP` and `# TYPE` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A histogram over fixed upper bounds, in seconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bound, cumulative; the last is +Inf (the count).
    buckets: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if value <= *b {
                self.buckets[i] += 1;
            }
        }
        self.buckets[self.bounds.len()] += 1;
        self.sum += value;
    }

    pub fn count(&self) -> u64 {
        self.buckets[self.bounds.len()]
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`a="b",c="d"`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.buckets[i]
            );
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_cumulative_and_counts_everything() {
        let mut h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 2.0, 20.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "kit=\"e\"");
        assert_eq!(
            out,
            "x_seconds_bucket{kit=\"e\",le=\"1\"} 1\nx_seconds_bucket{kit=\"e\",le=\"10\"} 2\n\
             x_seconds_bucket{kit=\"e\",le=\"+Inf\"} 3\nx_seconds_sum{kit=\"e\"} 22.5\n\
             x_seconds_count{kit=\"e\"} 3\n"
        );
    }
}
