//! Plain-text tables with aligned columns, and the cell formats `list`
//! and `info` share (state names, sizes, ages).

use metald_proto::vmprovisioner::v1 as pb;

use crate::error::one_line;

/// Columns separated by at least three spaces, each as wide as its widest
/// cell; cells are made single-line and free of control characters.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| one_line(c)).collect());
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `running` for `VM_STATE_RUNNING`; unknown numbers as `state(7)`.
pub fn state_name(s: &buffa::EnumValue<pb::VmState>) -> String {
    match s.as_known() {
        Some(k) => buffa::Enumeration::proto_name(&k)
            .trim_start_matches("VM_STATE_")
            .to_ascii_lowercase(),
        None => format!("state({})", s.to_i32()),
    }
}

/// Bytes in the largest IEC unit below them: exact when it divides them
/// (`128MiB`, `1GiB`), else to one decimal (`158.2MiB`).
pub fn size(bytes: i64) -> String {
    const UNITS: [(i64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit {
            if bytes % unit == 0 {
                return format!("{}{name}", bytes / unit);
            }
            return format!("{:.1}{name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes}B")
}

/// An age like kubectl's: `42s`, `5m`, `3h`, `2d` (the largest unit).
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time in UTC, RFC 3339, to the second.
pub fn timestamp(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_whatever_the_cells() {
        let mut t = Table::new(&["ID", "STATE"]);
        t.row(vec!["a-long-name".into(), "running".into()]);
        t.row(vec!["b\n\x1b".into(), "paused".into()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID            STATE");
        assert_eq!(lines[1], "a-long-name   running");
        assert_eq!(lines[2], "b             paused");
    }

    #[test]
    fn formats() {
        assert_eq!(size(128 << 20), "128MiB");
        assert_eq!(size(1 << 30), "1GiB");
        assert_eq!(size(1000), "1000B");
        assert_eq!(size(161976 << 10), "158.2MiB");
        assert_eq!(age(59), "59s");
        assert_eq!(age(3 * 3600 + 5), "3h");
        assert_eq!(age(-5), "0s");
        assert_eq!(state_name(&pb::VmState::VM_STATE_PAUSED.into()), "paused");
        assert_eq!(state_name(&buffa::EnumValue::from(9)), "state(9)");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
    }
}
