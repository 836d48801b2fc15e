//! The header: who is traced, how full the table is, how fast it moves, when it will be
//! full, and what fdtrace itself costs.

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Layout, Rect},
    text::{Line, Span},
    widgets::{Gauge, Paragraph, Widget},
};

use super::{App, format};
use crate::container::{self, Container};

pub struct Header<'a> {
    pub app: &'a App,
}

impl Widget for Header<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let [who, gauge_row, stats] = Layout::vertical([Constraint::Length(1); 3]).areas(area);
        self.who(who, buf);
        self.gauge(gauge_row, buf);
        self.stats(stats, buf);
    }
}

impl Header<'_> {
    fn who(&self, area: Rect, buf: &mut Buffer) {
        let (view, t) = (&self.app.view, &self.app.theme);
        let mut right = vec![Span::styled(format!(" {}", view.position), t.label)];
        if self.app.paused {
            right.push(Span::styled(" PAUSED", t.warn));
        }
        if !view.running && !view.processes.is_empty() {
            right.push(Span::styled(
                if view.position == "live" {
                    " · all exited"
                } else {
                    " · ended"
                },
                t.warn,
            ));
        }
        let right = Line::from(right).right_aligned();
        let right_width = right.width() as u16;

        let mut left = vec![Span::styled("fdtrace ", t.title)];
        let focus = view.focus_process();
        if let Some(p) = focus {
            left.push(Span::raw(format!("pid {}", p.pid)));
            // Next to the host pid, the one the container's own tools and logs show.
            let container = p.container.as_deref().map(Container::as_str);
            if let Some(placement) = container::placement(p.pid, p.ns_pid, container) {
                left.push(Span::styled(format!(" ({placement})"), t.label));
            }
            left.push(Span::raw(format!(" {}", p.comm)));
            if !p.exe.is_empty() {
                left.push(Span::styled(format!(" {}", p.exe), t.dim));
            }
            if !p.alive {
                left.push(Span::styled(" (exited)", t.warn));
            }
        } else {
            left.push(Span::styled("waiting for the first events", t.dim));
        }
        // The live ones by name, then the exited ones counted: a shell script runs thousands.
        let others: Vec<String> = view
            .processes
            .iter()
            .filter(|p| Some(p.pid) != view.focus)
            .map(|p| {
                format!(
                    "{} {}{}",
                    p.pid,
                    p.comm,
                    if p.alive { "" } else { " (exited)" }
                )
            })
            .collect();
        if !others.is_empty() {
            left.push(Span::styled(
                format!("  +{}: {}", others.len(), others.join(", ")),
                t.label,
            ));
        }
        if view.exited > 0 {
            left.push(Span::styled(
                format!(
                    "{}{} exited",
                    if others.is_empty() { "  +" } else { " · " },
                    view.exited
                ),
                t.dim,
            ));
        }
        let [l, r] =
            Layout::horizontal([Constraint::Fill(1), Constraint::Length(right_width)]).areas(area);
        Paragraph::new(Line::from(left)).render(l, buf);
        right.render(r, buf);
    }

    fn gauge(&self, area: Rect, buf: &mut Buffer) {
        let (view, t) = (&self.app.view, &self.app.theme);
        let rates = Line::from(vec![
            Span::styled(format::rate(view.opens_per_sec), t.title),
            Span::styled(" opens/s  ", t.label),
            Span::styled(format::rate(view.closes_per_sec), t.title),
            Span::styled(" closes/s", t.label),
        ]);
        let rates_width = rates.width() as u16 + 2;
        let [g, r] =
            Layout::horizontal([Constraint::Fill(1), Constraint::Length(rates_width)]).areas(area);
        rates.right_aligned().render(r, buf);
        let Some(p) = view.focus_process() else {
            return;
        };
        let ratio = p.fill().clamp(0.0, 1.0);
        let label = if p.limit.soft == u64::MAX {
            format!("{} open, no limit", p.open)
        } else {
            format!(
                "{}/{} open ({:.0}%)",
                p.open,
                p.limit.soft,
                p.fill() * 100.0
            )
        };
        Gauge::default()
            .ratio(ratio)
            .label(Span::styled(label, t.title))
            .gauge_style(t.level(ratio))
            .use_unicode(true)
            .render(g, buf);
    }

    fn stats(&self, area: Rect, buf: &mut Buffer) {
        let (view, t) = (&self.app.view, &self.app.theme);
        let sep = || Span::styled("  ", t.dim);
        let mut spans = Vec::new();
        if let Some(p) = view.focus_process() {
            spans.push(Span::styled("growth ", t.label));
            spans.push(Span::styled(
                format!("{}/min", format::growth(p.growth_per_min)),
                if p.growth_per_min > 0.0 {
                    t.warn
                } else {
                    t.good
                },
            ));
            spans.push(sep());
            let warn = self
                .app
                .warn_at
                .and_then(|pct| crate::headroom::threshold(p.limit.soft, pct));
            let (text, style) = if p.limit.soft != u64::MAX && p.open >= p.limit.soft {
                ("AT LIMIT".to_string(), t.bad)
            } else if let Some(at) = warn.filter(|&at| p.open >= at) {
                (format!("WARN ≥{at} (--warn-at)"), t.bad)
            } else if let Some(s) = p.forecast_secs {
                (
                    format!("limit in {}", format::secs(s)),
                    t.level(if s < 60.0 { 1.0 } else { 0.75 }),
                )
            } else {
                ("not growing".to_string(), t.good)
            };
            spans.push(Span::styled(text, style));
            spans.push(sep());
        }
        spans.push(Span::styled("EMFILE ", t.label));
        spans.push(Span::styled(
            view.incidents_total.to_string(),
            if view.incidents_total > 0 {
                t.bad
            } else {
                t.good
            },
        ));
        if view.unanswered > 0 {
            // Each a 502 at a proxy in front: as telling as the EMFILE count beside it.
            spans.push(sep());
            spans.push(Span::styled("closed unanswered ", t.label));
            spans.push(Span::styled(view.unanswered.to_string(), t.bad));
        }
        // A listener holding connections the app has not accepted: the backlog that turns
        // into a proxy's 504s once full.
        for q in view.listen.iter().filter(|q| q.queued > 0) {
            spans.push(sep());
            spans.push(Span::styled(format!("listen {} ", q.address), t.label));
            let queue = if q.backlog > 0 {
                format!("{}/{}", q.queued, q.backlog)
            } else {
                format!("{} queued", q.queued)
            };
            spans.push(Span::styled(queue, if q.full { t.bad } else { t.warn }));
            if let Some(since) = &q.full_since {
                spans.push(Span::styled(format!(" full since {since}"), t.bad));
            }
        }
        if view.listen_overflows > 0 {
            spans.push(sep());
            spans.push(Span::styled("listen overflows ", t.label));
            spans.push(Span::styled(view.listen_overflows.to_string(), t.bad));
        }
        spans.push(sep());
        spans.push(Span::styled("dropped ", t.label));
        spans.push(Span::styled(
            view.dropped.to_string(),
            if view.dropped > 0 { t.warn } else { t.good },
        ));
        for missed in view.losses.shortfalls() {
            spans.push(sep());
            spans.push(Span::styled(format!("{} ", missed.short), t.label));
            spans.push(Span::styled(missed.count.to_string(), t.warn));
        }
        let c = view.corrections;
        if c.added + c.removed + c.reused > 0 {
            spans.push(sep());
            spans.push(Span::styled("fixed ", t.label));
            spans.push(Span::styled(
                (c.added + c.removed + c.reused).to_string(),
                t.warn,
            ));
        }
        if let Some(probe) = view.probe {
            spans.push(sep());
            spans.push(Span::styled("probes ", t.label));
            spans.push(Span::raw(format!("{:.0}ns/run", probe.avg_ns)));
            if let Some(cpu) = probe.cpu_percent {
                spans.push(Span::raw(format!(" {cpu:.2}% CPU")));
            }
            if area.width >= 120 {
                spans.push(Span::styled(format!(" ({} runs)", probe.runs), t.dim));
            }
        }
        Paragraph::new(Line::from(spans)).render(area, buf);
    }
}
