//! Plain-text tables: a header, rows, columns padded to their widest cell; the leading label
//! columns are left-aligned, the rest (numbers) right-aligned.

use std::io::Write;

/// A table being built.
pub(crate) struct Table {
    header: Vec<String>,
    /// How many leading columns are labels (left-aligned).
    labels: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles, the first `labels` of them label columns.
    pub(crate) fn new(header: &[&str], labels: usize) -> Table {
        Table { header: header.iter().map(|h| (*h).to_owned()).collect(), labels, rows: Vec::new() }
    }

    /// Appends a row (missing cells are blank, extra cells are dropped).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// Writes the table, each line prefixed with `indent`.
    pub(crate) fn write(&self, out: &mut dyn Write, indent: &str) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| if i < self.labels { format!("{c:<w$}") } else { format!("{c:>w$}") })
                .collect();
            format!("{indent}{}", padded.join("  ").trim_end())
        };
        writeln!(out, "{}", line(&self.header))?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        writeln!(out, "{indent}{}", rule.join("  "))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["store", "GB/s"], 1);
        t.row(vec!["memory".into(), "12.5".into()]);
        t.row(vec!["shared_dir".into(), "3.1".into()]);
        let mut out = Vec::new();
        t.write(&mut out, "").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "store       GB/s\n----------  ----\nmemory      12.5\nshared_dir   3.1\n");
    }
}
