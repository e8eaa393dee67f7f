//! Metrics in the Prometheus text format, and the small HTTP endpoint that serves them.
//!
//! Counters, gauges (set, or computed when scraped) and histograms, each keyed by name and
//! label pairs. The series live in `prometheus-client` families in one of its registries,
//! and are written with its Prometheus text (0.0.4) encoder; this module keeps only the
//! by-name interface the controllers use, registering a family the first time its name is
//! used. Gauges are a small collector of our own: `prometheus-client` has no gauge
//! computed at scrape time that can be replaced by label set, and its `f64` gauges print
//! `1.0` where scrapers and people expect `1`.
//!
//! The endpoint answers `GET /metrics` (and `/healthz`) over HTTP/1.0 on a plain
//! `TcpListener`: scrapers need nothing more.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, prometheus_text},
    metrics::{
        MetricType, counter::Counter, family::Family as LabelledFamily, histogram::Histogram,
    },
    registry::Registry,
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

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// One named family, as registered.
#[derive(Clone)]
enum Family {
    Counter(LabelledFamily<Labels, Counter>),
    Gauge(Arc<Gauges>),
    /// The histograms, and their counts of observations (which `prometheus-client`
    /// encodes but does not let one read), unregistered, for [`Metrics::value`].
    Histogram(
        LabelledFamily<Labels, Histogram, fn() -> Histogram>,
        LabelledFamily<Labels, Counter>,
    ),
}

/// A gauge family: values set, or functions called at each scrape.
#[derive(Debug)]
struct Gauges {
    name: String,
    help: String,
    series: Mutex<BTreeMap<Labels, Gauge>>,
    /// What the functions returned at the last [`Metrics::render`], which calls them
    /// before encoding so that no registry lock is held while they run.
    scraped: Mutex<BTreeMap<Labels, f64>>,
}

#[derive(Clone)]
enum Gauge {
    Set(f64),
    Computed(GaugeFn),
}

impl std::fmt::Debug for Gauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gauge::Set(v) => write!(f, "Set({v})"),
            Gauge::Computed(_) => f.write_str("Computed"),
        }
    }
}

impl Gauge {
    fn read(&self) -> f64 {
        match self {
            Gauge::Set(v) => *v,
            Gauge::Computed(f) => f(),
        }
    }
}

impl Gauges {
    /// Reads every gauge (calling the functions) into `scraped`.
    fn scrape(&self) {
        let series: Vec<(Labels, Gauge)> = lock(&self.series)
            .iter()
            .map(|(l, g)| (l.clone(), g.clone()))
            .collect();
        let values = series.into_iter().map(|(l, g)| (l, g.read())).collect();
        *lock(&self.scraped) = values;
    }
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let scraped = lock(&self.scraped);
        let mut family =
            encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Gauge)?;
        for (labels, value) in scraped.iter() {
            let mut metric = family.encode_family(labels)?;
            // Whole numbers (depths, counts, flags) print as integers.
            if value.fract() == 0.0 && value.abs() < 1e15 {
                metric.encode_gauge(&(*value as i64))?;
            } else {
                metric.encode_gauge(value)?;
            }
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Inner {
    registry: Mutex<Registry>,
    families: Mutex<HashMap<String, Family>>,
}

/// A registry of metrics. Cheap to clone; clones share the registry.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
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

    /// The family called `name`, registered by `create` the first time.
    fn family(&self, name: &str, help: &str, create: impl FnOnce(&str, &str) -> Family) -> Family {
        let mut families = lock(&self.inner.families);
        if let Some(family) = families.get(name) {
            return family.clone();
        }
        // The encoder adds the final full stop to help texts, and `_total` to counters.
        let help = help.strip_suffix('.').unwrap_or(help);
        let family = create(name, help);
        let mut registry = lock(&self.inner.registry);
        match &family {
            Family::Counter(f) => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                registry.register(base, help, f.clone());
            }
            Family::Gauge(g) => registry.register_collector(Box::new(g.clone())),
            Family::Histogram(f, _) => registry.register(name, help, f.clone()),
        }
        families.insert(name.to_owned(), family.clone());
        family
    }

    /// Adds one to a counter.
    pub fn inc_counter(&self, name: &str, help: &str, pairs: &[(&str, &str)]) {
        let family = self.family(
            name,
            help,
            |_, _| Family::Counter(LabelledFamily::default()),
        );
        if let Family::Counter(f) = family {
            f.get_or_create(&labels(pairs)).inc();
        }
    }

    fn gauges(&self, name: &str, help: &str) -> Option<Arc<Gauges>> {
        let family = self.family(name, help, |name, help| {
            Family::Gauge(Arc::new(Gauges {
                name: name.to_owned(),
                // The registry adds the full stop for the families it describes; this one
                // describes itself.
                help: format!("{help}."),
                series: Mutex::default(),
                scraped: Mutex::default(),
            }))
        });
        match family {
            Family::Gauge(g) => Some(g),
            _ => None,
        }
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, name: &str, help: &str, pairs: &[(&str, &str)], value: f64) {
        if let Some(g) = self.gauges(name, help) {
            lock(&g.series).insert(labels(pairs), Gauge::Set(value));
        }
    }

    /// Registers a gauge computed at each scrape (replacing one with the same labels).
    pub fn gauge_fn(
        &self,
        name: &str,
        help: &str,
        pairs: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        if let Some(g) = self.gauges(name, help) {
            lock(&g.series).insert(labels(pairs), Gauge::Computed(Arc::new(f)));
        }
    }

    /// Records one observation in a histogram of durations.
    pub fn observe(&self, name: &str, help: &str, pairs: &[(&str, &str)], duration: Duration) {
        let family = self.family(name, help, |_, _| {
            Family::Histogram(
                LabelledFamily::new_with_constructor(duration_histogram),
                LabelledFamily::default(),
            )
        });
        if let Family::Histogram(f, counts) = family {
            let labels = labels(pairs);
            f.get_or_create(&labels).observe(duration.as_secs_f64());
            counts.get_or_create(&labels).inc();
        }
    }

    /// The value of a counter or gauge (a histogram's count), for tests and reports.
    pub fn value(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let family = lock(&self.inner.families).get(name)?.clone();
        let labels = labels(pairs);
        match family {
            Family::Counter(f) => f.get(&labels).map(|c| c.get() as f64),
            Family::Gauge(g) => {
                let gauge = lock(&g.series).get(&labels)?.clone();
                Some(gauge.read())
            }
            Family::Histogram(_, counts) => counts.get(&labels).map(|c| c.get() as f64),
        }
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        // Gauge functions may lock other state; call them without holding the registry.
        let gauges: Vec<Arc<Gauges>> = lock(&self.inner.families)
            .values()
            .filter_map(|f| match f {
                Family::Gauge(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        for g in gauges {
            g.scrape();
        }
        let mut out = String::new();
        // Writing to a String cannot fail, and every family here encodes.
        let _ = prometheus_text::encode(&mut out, &lock(&self.inner.registry));
        out
    }
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
                "/metrics" => ("200 OK", prometheus_text::CONTENT_TYPE, metrics.render()),
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

    #[test]
    fn names_and_help_texts_are_written_once() {
        let m = Metrics::new();
        m.inc_counter("ferro_reconciles_total", "Reconciles.", &[]);
        m.observe(
            "ferro_seconds",
            "Durations.",
            &[],
            Duration::from_millis(1500),
        );
        m.observe(
            "ferro_seconds",
            "Durations.",
            &[],
            Duration::from_millis(500),
        );
        m.set_gauge("ferro_ratio", "A ratio.", &[], 0.25);
        let text = m.render();
        assert!(
            text.contains("# HELP ferro_reconciles_total Reconciles.\n"),
            "{text}"
        );
        assert!(text.contains("ferro_reconciles_total 1\n"), "{text}");
        assert!(text.contains("ferro_seconds_sum 2.0\n"), "{text}");
        assert!(
            text.contains("ferro_seconds_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ferro_ratio 0.25\n"), "{text}");
        assert!(!text.contains(".."), "{text}");
        assert_eq!(m.value("ferro_seconds", &[]), Some(2.0));
        assert_eq!(m.value("ferro_ratio", &[]), Some(0.25));
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
