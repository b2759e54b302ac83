//! Printing rows for people (aligned tables) and programs (CSV, JSON), and
//! reading times from the command line.

use std::io::Write;

use jiff::{SignedDuration, Timestamp};
use wardflow_model::TimestampNs;

/// How a command prints rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Rows of text with a header, printed in the chosen format. For JSON the
/// caller passes the serializable records separately.
pub struct Rows {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Rows {
    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut width: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line =
            |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
                let mut first = true;
                let mut text = String::new();
                for (c, w) in cells.zip(&width) {
                    if !first {
                        text.push_str("  ");
                    }
                    first = false;
                    text.push_str(c);
                    text.extend(std::iter::repeat_n(
                        ' ',
                        w.saturating_sub(c.chars().count()),
                    ));
                }
                writeln!(out, "{}", text.trim_end())
            };
        line(out, &mut self.header.iter().copied())?;
        for r in &self.rows {
            line(out, &mut r.iter().map(String::as_str))?;
        }
        Ok(())
    }

    pub fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        let cell = |c: &str| {
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.to_string()
            }
        };
        writeln!(out, "{}", self.header.join(","))?;
        for r in &self.rows {
            writeln!(
                out,
                "{}",
                r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(",")
            )?;
        }
        Ok(())
    }
}

/// RFC 3339 in UTC with milliseconds.
pub fn format_time(ns: TimestampNs) -> String {
    match Timestamp::from_nanosecond(ns as i128) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => ns.to_string(),
    }
}

/// Reads a time given on the command line: RFC 3339, a date (midnight
/// UTC), `now`, or `-DURATION` before now (`-15m`, `-2h`, `-1d`).
pub fn parse_time(flag: &str, s: &str) -> anyhow::Result<TimestampNs> {
    let now = wardflow_model::now_ns();
    let parsed = if s == "now" {
        Some(now)
    } else if let Some(rel) = s.strip_prefix('-') {
        let nanos = match rel.strip_suffix('d').and_then(|d| d.parse::<i64>().ok()) {
            Some(days) => days.checked_mul(86_400_000_000_000),
            None => rel
                .parse::<SignedDuration>()
                .ok()
                .and_then(|d| i64::try_from(d.as_nanos()).ok()),
        };
        nanos.map(|d| now - d)
    } else if let Ok(t) = s.parse::<Timestamp>() {
        i64::try_from(t.as_nanosecond()).ok()
    } else if let Ok(d) = s.parse::<jiff::civil::Date>() {
        d.to_zoned_datetime(jiff::tz::TimeZone::UTC)
            .ok()
            .and_then(|z| i64::try_from(z.timestamp().as_nanosecond()).ok())
    } else {
        None
    };
    parsed.ok_or_else(|| {
        anyhow::anyhow!(
            "{flag}: cannot read {s:?} as a time; use RFC 3339 (2026-11-25T10:00:00Z), a date (2026-11-25), \"now\", or a time before now such as -15m, -2h or -1d"
        )
    })
}

/// Reads a duration such as `30s`, `5m`, `1h30m`.
pub fn parse_duration(flag: &str, s: &str) -> anyhow::Result<std::time::Duration> {
    s.parse::<SignedDuration>()
        .ok()
        .and_then(|d| std::time::Duration::try_from(d).ok())
        .ok_or_else(|| {
            anyhow::anyhow!("{flag}: cannot read {s:?} as a duration; use e.g. 30s, 5m or 1h30m")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_documented_form() {
        let now = wardflow_model::now_ns();
        assert_eq!(
            parse_time("--from", "2026-11-25T10:00:00Z").unwrap(),
            1_795_600_800_000_000_000
        );
        assert_eq!(
            parse_time("--from", "2026-11-25").unwrap(),
            1_795_564_800_000_000_000
        );
        let hour_ago = parse_time("--from", "-1h").unwrap();
        assert!((now - hour_ago - 3_600_000_000_000).abs() < 5_000_000_000);
        let day_ago = parse_time("--from", "-1d").unwrap();
        assert!((now - day_ago - 86_400_000_000_000).abs() < 5_000_000_000);
        let err = parse_time("--to", "yesterday").unwrap_err().to_string();
        assert!(err.starts_with("--to: cannot read \"yesterday\""), "{err}");
        assert_eq!(parse_duration("--duration", "90s").unwrap().as_secs(), 90);
        assert_eq!(
            parse_duration("--duration", "1h30m").unwrap().as_secs(),
            5400
        );
        assert!(parse_duration("--duration", "soon").is_err());
    }

    #[test]
    fn csv_quotes_what_needs_it_and_tables_align() {
        let rows = Rows {
            header: vec!["a", "bb"],
            rows: vec![
                vec!["x,y".into(), "1".into()],
                vec!["z".into(), "say \"hi\"".into()],
            ],
        };
        let mut csv = Vec::new();
        rows.write_csv(&mut csv).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "a,bb\n\"x,y\",1\nz,\"say \"\"hi\"\"\"\n"
        );
        let mut table = Vec::new();
        rows.write_table(&mut table).unwrap();
        assert_eq!(
            String::from_utf8(table).unwrap(),
            "a    bb\nx,y  1\nz    say \"hi\"\n"
        );
        assert_eq!(
            format_time(1_795_600_800_123_000_000),
            "2026-11-25T10:00:00.123Z"
        );
    }
}
