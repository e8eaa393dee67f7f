//! Metrics in the Prometheus text format, and the small HTTP endpoint that serves them.
//!
//! Counters, gauges (set, or computed when scraped) and histograms, each keyed by name and
//! label pairs. The endpoint answers `GET /metrics` (and `/healthz`) over HTTP/1.0 on a
//! plain `TcpListener`: scrapers need nothing more, and the binary stays free of an HTTP
//! server stack.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// The upper bounds of reconcile duration buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type Labels = Vec<(String, String)>;
type GaugeFn = Arc<dyn Fn() -> f64 + Send + Sync>;
/// Name, help, type and series of each family, copied out of the registry for rendering.
type Snapshot = Vec<(String, String, &'static str, Vec<(Labels, Value)>)>;

#[derive(Clone)]
enum Value {
    Counter(f64),
    Gauge(f64),
    GaugeFn(GaugeFn),
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Default)]
struct Family {
    help: String,
    kind: &'static str,
    series: BTreeMap<Labels, Value>,
}

/// A registry of metrics. Cheap to clone; clones share the registry.
#[derive(Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_series(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        pairs: &[(&str, &str)],
        f: impl FnOnce(&mut Option<Value>),
    ) {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            ..Default::default()
        });
        let key = labels(pairs);
        let mut value = family.series.remove(&key);
        f(&mut value);
        if let Some(value) = value {
            family.series.insert(key, value);
        }
    }

    /// Adds one to a counter.
    pub fn inc_counter(&self, name: &str, help: &str, pairs: &[(&str, &str)]) {
        self.with_series(name, help, "counter", pairs, |v| match v {
            Some(Value::Counter(c)) => *c += 1.0,
            _ => *v = Some(Value::Counter(1.0)),
        });
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, name: &str, help: &str, pairs: &[(&str, &str)], value: f64) {
        self.with_series(name, help, "gauge", pairs, |v| {
            *v = Some(Value::Gauge(value))
        });
    }

    /// Registers a gauge computed at each scrape (replacing one with the same labels).
    pub fn gauge_fn(
        &self,
        name: &str,
        help: &str,
        pairs: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        let f: GaugeFn = Arc::new(f);
        self.with_series(name, help, "gauge", pairs, |v| *v = Some(Value::GaugeFn(f)));
    }

    /// Records one observation in a histogram of durations.
    pub fn observe(&self, name: &str, help: &str, pairs: &[(&str, &str)], duration: Duration) {
        let seconds = duration.as_secs_f64();
        self.with_series(name, help, "histogram", pairs, |v| {
            if !matches!(v, Some(Value::Histogram { .. })) {
                *v = Some(Value::Histogram {
                    counts: vec![0; BUCKETS.len()],
                    sum: 0.0,
                    count: 0,
                });
            }
            if let Some(Value::Histogram { counts, sum, count }) = v {
                for (i, bound) in BUCKETS.iter().enumerate() {
                    if seconds <= *bound {
                        counts[i] += 1;
                    }
                }
                *sum += seconds;
                *count += 1;
            }
        });
    }

    /// The value of a counter or gauge, for tests and reports.
    pub fn value(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        match families.get(name)?.series.get(&labels(pairs))? {
            Value::Counter(v) | Value::Gauge(v) => Some(*v),
            Value::GaugeFn(f) => Some(f()),
            Value::Histogram { count, .. } => Some(*count as f64),
        }
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        // Gauge functions may lock other state; read them without holding the registry.
        let snapshot: Snapshot = {
            let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
            families
                .iter()
                .map(|(name, f)| {
                    (
                        name.clone(),
                        f.help.clone(),
                        f.kind,
                        f.series
                            .iter()
                            .map(|(l, v)| (l.clone(), v.clone()))
                            .collect(),
                    )
                })
                .collect()
        };
        let mut out = String::new();
        for (name, help, kind, series) in snapshot {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in series {
                match value {
                    Value::Counter(v) | Value::Gauge(v) => {
                        let _ =
                            writeln!(out, "{name}{} {}", render_labels(&labels, None), number(v));
                    }
                    Value::GaugeFn(f) => {
                        let _ = writeln!(
                            out,
                            "{name}{} {}",
                            render_labels(&labels, None),
                            number(f())
                        );
                    }
                    Value::Histogram { counts, sum, count } => {
                        for (bound, c) in BUCKETS.iter().zip(&counts) {
                            let le = number(*bound);
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {c}",
                                render_labels(&labels, Some(&le))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {count}",
                            render_labels(&labels, Some("+Inf"))
                        );
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            render_labels(&labels, None),
                            number(sum)
                        );
                        let _ =
                            writeln!(out, "{name}_count{} {count}", render_labels(&labels, None));
                    }
                }
            }
        }
        out
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn render_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` and `GET /healthz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            // A scraper sends a few hundred bytes; stop at the end of the headers.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::new();
        m.inc_counter("ferro_errors_total", "Errors.", &[("controller", "ipam")]);
        m.inc_counter("ferro_errors_total", "Errors.", &[("controller", "ipam")]);
        m.set_gauge("ferro_leader", "Leading.", &[], 1.0);
        m.gauge_fn("ferro_depth", "Depth.", &[("controller", "a\"b")], || 7.0);
        m.observe(
            "ferro_seconds",
            "Durations.",
            &[("controller", "gc")],
            Duration::from_millis(3),
        );
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE ferro_errors_total counter\nferro_errors_total{controller=\"ipam\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("ferro_leader 1\n"), "{text}");
        assert!(
            text.contains("ferro_depth{controller=\"a\\\"b\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("ferro_seconds_bucket{controller=\"gc\",le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("ferro_seconds_bucket{controller=\"gc\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ferro_seconds_bucket{controller=\"gc\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ferro_seconds_count{controller=\"gc\"} 1\n"),
            "{text}"
        );
        assert_eq!(
            m.value("ferro_errors_total", &[("controller", "ipam")]),
            Some(2.0)
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new();
        m.set_gauge("ferro_up", "Up.", &[], 1.0);
        let server = tokio::spawn(serve(listener, m));
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
        assert!(response.ends_with("ferro_up 1\n"), "{response}");
        server.abort();
    }
}
