//! An example tool for `bulwark run`: reads a JSON array of objects on stdin, ranks them by a
//! numeric field (argument 1, default `score`), and writes a JSON report to stdout:
//! `{"field": ..., "count": n, "mean": x, "ranked": [{"rank": 1, ...record}, ...]}`.
//! Bad input is reported on stderr with exit code 2.

use std::io::Read;

use serde_json::{Map, Value, json};

fn fail(message: &str) -> ! {
    eprintln!("json-rank: {message}");
    std::process::exit(2);
}

fn main() {
    let field = std::env::args().nth(1).unwrap_or_else(|| "score".into());
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        fail("standard input is not UTF-8 text");
    }
    let records: Vec<Map<String, Value>> = match serde_json::from_str::<Value>(&input) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(map) => map,
                _ => fail("every element must be an object"),
            })
            .collect(),
        Ok(_) => fail("the input must be a JSON array"),
        Err(e) => fail(&format!("the input is not JSON: {e}")),
    };
    let score = |r: &Map<String, Value>| r.get(&field).and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY);
    let mut ranked = records;
    ranked.sort_by(|a, b| score(b).total_cmp(&score(a)));
    let scores: Vec<f64> = ranked.iter().map(score).filter(|s| s.is_finite()).collect();
    let mean = if scores.is_empty() { 0.0 } else { scores.iter().sum::<f64>() / scores.len() as f64 };
    let ranked: Vec<Value> = ranked
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.insert("rank".into(), json!(i + 1));
            Value::Object(r)
        })
        .collect();
    let report = json!({ "field": field, "count": ranked.len(), "mean": mean, "ranked": ranked });
    println!("{report}");
}
