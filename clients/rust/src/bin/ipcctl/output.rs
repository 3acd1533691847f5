//! Output formatting: JSON lines, aligned tables, ages.

use std::io::{self, Write};

use ipc_client::Member;

pub fn print_json(value: &impl serde::Serialize) -> io::Result<()> {
    let line = serde_json::to_string(value).map_err(io::Error::other)?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// An aligned table: ID APP ROLE TAG NODE AGE LABELS.
pub fn members_table(members: &[Member], now_ms: i64) -> String {
    let header = ["ID", "APP", "ROLE", "TAG", "NODE", "AGE", "LABELS"].map(String::from);
    let mut rows = vec![header.to_vec()];
    for member in members {
        let labels: Vec<String> = member
            .labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        rows.push(vec![
            member.id.clone(),
            member.app.clone(),
            dash(&member.role),
            dash(&member.tag),
            member.node.clone(),
            age(now_ms.saturating_sub(member.connected_ms)),
            dash(&labels.join(",")),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns, two spaces apart, trailing spaces trimmed.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            rows.iter()
                .map(|row| row[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

/// `45s`, `12m`, `3h`, `2d`, as `kubectl get` shows ages.
pub fn age(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn members_table_aligns_columns_and_shows_ages() {
        let member = Member {
            id: "w-1".into(),
            app: "shop".into(),
            role: "worker".into(),
            labels: BTreeMap::from([("zone".into(), "eu".into())]),
            node: "n1".into(),
            connected_ms: 1_000,
            ..Member::default()
        };
        let table = members_table(&[member], 1_000 + 3_600_000);
        assert_eq!(
            table,
            "ID   APP   ROLE    TAG  NODE  AGE  LABELS\n\
             w-1  shop  worker  -    n1    60m  zone=eu\n"
        );
    }
}
