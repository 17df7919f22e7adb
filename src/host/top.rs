//! `ebb top`: a live view of a running host, esxtop-style. A header with the budget, free
//! memory, minFree and the state; one row per VM with its memory by state, its target and
//! what its reclaimers are doing. [`draw`] is pure (tests render it into ratatui's test
//! backend); [`run`] polls the host's socket and redraws until `q`.

use std::path::Path;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;

use super::report::HostReport;
use crate::api::client::Client;

/// `bytes` in MiB, as the table shows sizes.
fn mib(bytes: u64) -> String {
    format!("{}M", bytes >> 20)
}

fn signed_mib(bytes: i64) -> String {
    format!("{}M", bytes / (1 << 20))
}

/// What VM's reclaimers do: balloon target, reclaim target, sharing rate.
fn reclaimers(v: &super::report::VmReport) -> String {
    let mut parts = Vec::new();
    if v.balloon_target_bytes > 0 {
        parts.push(format!("balloon {}", mib(v.balloon_target_bytes)));
    }
    if let Some(t) = v.reclaim_target_bytes {
        parts.push(format!("reclaim to {}", mib(t)));
    }
    if let Some(cap) = v.alloc_wait_above_bytes {
        parts.push(format!("wait above {}", mib(cap)));
    }
    if v.share_scan_rate > 0 {
        parts.push(format!("share {}/s", v.share_scan_rate));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

const HEADERS: [&str; 12] = [
    "VM",
    "PID",
    "CONFIG",
    "CONSUMED",
    "ACTIVE",
    "SHARED",
    "BALLOON",
    "ZIP",
    "SWAP",
    "TARGET",
    "RECLAIMERS",
    "STATUS",
];

/// Draws `report` (or `error`, when the host did not answer) into `frame`.
pub fn draw(frame: &mut Frame, report: &HostReport, error: Option<&str>) {
    let [head, body] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(1)]).areas(frame.area());
    let mut lines = vec![Line::from(format!(
        "ebb host  policy {}  state {}  budget {}  free {}  minFree {}  transitions {}  up {:.1} s",
        report.policy,
        report.state.to_uppercase(),
        mib(report.budget_bytes),
        signed_mib(report.free_bytes),
        mib(report.min_free_bytes),
        report.transitions,
        report.t_ms as f64 / 1000.0,
    ))];
    let consumed: u64 = report.vms.iter().map(|v| v.consumed_bytes).sum();
    let configured: u64 = report.vms.iter().map(|v| v.configured_bytes).sum();
    lines.push(Line::from(format!(
        "VMs {}  configured {}  consumed {}  tick cpu {} us",
        report.vms.len(),
        mib(configured),
        mib(consumed),
        report.tick_cpu_us
    )));
    if let Some(e) = error {
        lines.push(Line::from(format!("host: {e}")));
    }
    frame.render_widget(Paragraph::new(lines), head);
    let rows = report.vms.iter().map(|v| {
        Row::new(vec![
            v.name.clone(),
            v.pid.to_string(),
            mib(v.configured_bytes),
            mib(v.consumed_bytes),
            mib(v.active_bytes),
            mib(v.shared_bytes),
            mib(v.ballooned_bytes),
            mib(v.compressed_bytes),
            mib(v.swapped_bytes),
            mib(v.target_bytes),
            reclaimers(v),
            v.exit.clone().unwrap_or_else(|| "running".into()),
        ])
    });
    let widths = [
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Min(20),
        Constraint::Length(16),
    ];
    let table = Table::new(rows, widths)
        .header(Row::new(HEADERS).style(Style::new().add_modifier(Modifier::REVERSED)))
        .block(Block::bordered().title(" VMs "));
    frame.render_widget(table, body);
}

/// Polls the host at `sock` every `interval` and redraws until `q`, Esc or Ctrl-C.
///
/// # Errors
/// The terminal cannot be driven.
pub fn run(sock: &Path, interval: Duration) -> std::io::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| {
        let mut report = HostReport::default();
        loop {
            let client = Client::new(sock).with_timeout(interval.max(Duration::from_secs(1)));
            let error = match client.host_stats() {
                Ok(r) => {
                    report = r;
                    None
                }
                Err(e) => Some(e.to_string()),
            };
            terminal.draw(|f| draw(f, &report, error.as_deref()))?;
            if event::poll(interval)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::report::VmReport;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(report: &HostReport, error: Option<&str>) -> String {
        let mut t = Terminal::new(TestBackend::new(150, 8)).unwrap();
        t.draw(|f| draw(f, report, error)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_string()).collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_header_and_one_row_per_vm_show_the_figures() {
        let report = HostReport {
            policy: "esx".into(),
            state: "soft".into(),
            budget_bytes: 768 << 20,
            free_bytes: 20 << 20,
            min_free_bytes: 46 << 20,
            transitions: 3,
            vms: vec![
                VmReport {
                    name: "web".into(),
                    pid: 4242,
                    configured_bytes: 512 << 20,
                    consumed_bytes: 300 << 20,
                    compressed_bytes: 100 << 20,
                    target_bytes: 256 << 20,
                    reclaim_target_bytes: Some(250 << 20),
                    share_scan_rate: 10_000,
                    ..Default::default()
                },
                VmReport {
                    name: "db".into(),
                    exit: Some("exit status 0".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = screen(&report, None);
        assert!(s.contains("state SOFT  budget 768M  free 20M  minFree 46M  transitions 3"), "{s}");
        let web = s.lines().find(|l| l.contains("web")).unwrap();
        for cell in
            ["4242", "512M", "300M", "100M", "256M", "reclaim to 250M, share 10000/s", "running"]
        {
            assert!(web.contains(cell), "{cell} missing from {web:?}");
        }
        assert!(s.lines().any(|l| l.contains("db") && l.contains("exit status 0")), "{s}");
        assert!(s.contains("CONSUMED") && s.contains("RECLAIMERS"));
    }

    #[test]
    fn a_host_that_does_not_answer_is_said_so() {
        let s = screen(&HostReport::default(), Some("connection refused"));
        assert!(s.contains("host: connection refused"), "{s}");
    }
}
