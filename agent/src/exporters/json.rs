//! JSON rendering of a snapshot, for `perch collect --format json`: one
//! object per metric with its points, start times and attributes, so scripts
//! and tests can read values without a Prometheus parser.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::model::{AttrValue, Attributes, Buckets, Data, Number, Snapshot};

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn attrs(a: &Attributes) -> Value {
    let mut m = Map::new();
    for (k, v) in a {
        m.insert(
            (*k).to_owned(),
            match v {
                AttrValue::Str(s) => Value::from(s.clone()),
                AttrValue::Int(i) => Value::from(*i),
            },
        );
    }
    Value::Object(m)
}

fn number(n: Number) -> Value {
    match n {
        Number::Int(i) => Value::from(i),
        Number::Double(d) => Value::from(d),
    }
}

/// The snapshot as a JSON value.
pub fn render(snapshot: &Snapshot) -> Value {
    let metrics: Vec<Value> = snapshot
        .metrics
        .iter()
        .map(|m| {
            let (kind, points): (&str, Vec<Value>) = match &m.data {
                Data::Sum { monotonic, points } => (
                    if *monotonic { "counter" } else { "updown_counter" },
                    points
                        .iter()
                        .map(|p| {
                            json!({"attributes": attrs(&p.attributes), "value": number(p.value),
                                   "start_time": p.start_time.map(secs), "time": secs(p.time)})
                        })
                        .collect(),
                ),
                Data::Gauge { points } => (
                    "gauge",
                    points
                        .iter()
                        .map(|p| json!({"attributes": attrs(&p.attributes), "value": number(p.value), "time": secs(p.time)}))
                        .collect(),
                ),
                Data::Histogram { points } => (
                    "histogram",
                    points
                        .iter()
                        .map(|p| {
                            let buckets = match &p.buckets {
                                Buckets::Explicit { bounds, counts } => {
                                    json!({"bounds": &**bounds, "bucket_counts": counts})
                                }
                                Buckets::Exponential(e) => json!({
                                    "scale": e.scale, "zero_count": e.zero_count,
                                    "offset": e.offset, "bucket_counts": e.counts,
                                }),
                            };
                            let mut v = json!({"attributes": attrs(&p.attributes), "count": p.count, "sum": p.sum,
                                   "start_time": secs(p.start_time), "time": secs(p.time)});
                            if let (Some(v), Some(b)) = (v.as_object_mut(), buckets.as_object()) {
                                v.extend(b.clone());
                            }
                            v
                        })
                        .collect(),
                ),
            };
            json!({"name": m.name, "unit": m.unit, "type": kind, "description": m.description, "points": points})
        })
        .collect();
    json!({"time": secs(snapshot.time), "metrics": metrics})
}
