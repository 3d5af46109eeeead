//! The endpoint's log lines cannot be forged by its peers. User names, agent names, VM
//! names, migration ids and paths come from the network; a newline in one of them, logged
//! as is, starts a line that looks like the endpoint's own ("a user name with a newline
//! forged a log line"). Fields that carry a peer's text are logged with `?` (escaped by
//! Debug), and as a second line of defence every line goes through [`EscapeControl`],
//! which writes control characters inside an event as escapes: one event, one line.
//!
//! Lines are text by default, or JSON objects (`--log-format json`), one per line, for
//! log collectors: the event's fields, its level, target and time, and the span it ran
//! in with its fields (`migration_id` for a migration's lines).

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process's subscriber: `filter` (tracing env-filter syntax) in `format`,
/// on standard error, control characters escaped.
pub fn init(filter: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        // Colour codes would be escaped like any control character a peer sends.
        .with_ansi(false)
        .with_writer(EscapedStderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Writes each formatted event with its control characters escaped (`\n`, `\r`,
/// `\u{1b}`...), except its final newline and tabs. tracing-subscriber formats an event
/// into one buffer and writes it with one `write_all`, so one call is one event.
#[derive(Debug)]
pub struct EscapeControl<W>(pub W);

impl<W: Write> Write for EscapeControl<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let (event, end) = match buf.strip_suffix(b"\n") {
            Some(event) => (event, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let text = String::from_utf8_lossy(event);
        if !text.chars().any(needs_escape) {
            return self.0.write_all(buf);
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c if needs_escape(c) => out.push_str(&c.escape_unicode().to_string()),
                c => out.push(c),
            }
        }
        self.0.write_all(out.as_bytes())?;
        self.0.write_all(end)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Control characters (C0, DEL, C1, which some viewers take as line ends) and the Unicode
/// line and paragraph separators; tabs are harmless.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}'
}

/// Standard error through [`EscapeControl`], for `tracing_subscriber::fmt().with_writer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedStderr;

impl<'a> MakeWriter<'a> for EscapedStderr {
    type Writer = EscapeControl<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapeControl(io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(input: &str) -> String {
        let mut out = EscapeControl(Vec::new());
        out.write_all(input.as_bytes()).unwrap();
        String::from_utf8(out.0).unwrap()
    }

    #[test]
    fn a_forged_line_stays_inside_its_event() {
        let line = "WARN login failed user=admin\n2026-01-01T00:00:00Z INFO API session started user=root\n";
        let out = escaped(line);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.ends_with('\n'));
        assert!(out.contains("user=admin\\n2026-01-01"), "{out}");
    }

    #[test]
    fn carriage_returns_escapes_and_separators_are_escaped_and_plain_text_is_kept() {
        assert_eq!(
            escaped("a\rb\u{1b}[31mc\u{85}d\u{2028}e\tf\n"),
            "a\\rb\\u{1b}[31mc\\u{85}d\\u{2028}e\tf\n"
        );
        assert_eq!(escaped("plain line, ünïcode\n"), "plain line, ünïcode\n");
    }
}
