//! Printing results: human tables by default, JSON with `--json`, progress
//! only when not `--quiet`.

use std::io::Write;

use crate::error::CliError;

/// Where a command prints.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// `--json`.
    pub json: bool,
    /// `--quiet`.
    pub quiet: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    /// Prints a JSON document on stdout (pretty, one document).
    pub fn json_doc(&self, v: &serde_json::Value) {
        let text = serde_json::to_string_pretty(v).expect("a JSON value always serializes");
        println_safe(&text);
    }

    /// Prints one JSON line on stdout.
    pub fn json_line(&self, v: &serde_json::Value) {
        println_safe(&v.to_string());
    }

    /// Prints a line of progress on stderr unless `--quiet`.
    pub fn progress(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Prints a warning on stderr (always: warnings are not progress).
    pub fn warn(&self, msg: &str) {
        if self.json {
            eprintln!("{}", serde_json::json!({ "warning": msg }));
        } else {
            eprintln!("warning: {msg}");
        }
    }

    /// Prints an error on stderr.
    pub fn error(&self, e: &CliError) {
        if self.json {
            eprintln!("{}", e.to_json());
        } else {
            eprintln!("{e}");
        }
    }
}

/// Prints a line on stdout; a closed pipe (`vmr ... | head`) ends the process
/// quietly instead of panicking.
pub fn println_safe(line: &str) {
    let mut so = std::io::stdout().lock();
    if writeln!(so, "{line}").and_then(|_| so.flush()).is_err() {
        std::process::exit(0);
    }
}

/// A plain text table: left-aligned columns, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut s = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == r.len() {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    pub fn print(&self) {
        let text = self.render();
        println_safe(text.trim_end_matches('\n'));
    }
}
