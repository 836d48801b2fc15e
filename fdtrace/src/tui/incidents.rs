//! The EMFILE/ENFILE list and the selected incident's blame.

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Rect},
    text::{Line, Span},
    widgets::{Block, Paragraph, Row, StatefulWidget, Table, TableState, Widget, Wrap},
};

use super::{
    App,
    app::Pane,
    format,
    sites::{frame_lines, pane_block},
    view::IncidentRow,
};
use crate::report::place;

pub struct IncidentsTable<'a> {
    pub app: &'a App,
    pub focused: bool,
    pub tabs: bool,
}

impl Widget for IncidentsTable<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let rows = app.shown_incidents();
        let more = app.view.incidents_total.saturating_sub(rows.len() as u64);
        let title = if more > 0 {
            format!(
                " EMFILE/ENFILE {} ({more} not kept) ",
                app.view.incidents_total
            )
        } else {
            format!(" EMFILE/ENFILE {} ", app.view.incidents_total)
        };
        let block = pane_block(app, Pane::Incidents, title, self.focused, self.tabs);
        if rows.is_empty() {
            Paragraph::new(Line::styled("none yet", t.dim))
                .block(block)
                .render(area, buf);
            return;
        }
        let wide = area.width >= 100;
        let body: Vec<Row> = rows
            .iter()
            .map(|i| {
                let top = i.blame.first().map_or_else(String::new, |b| {
                    format!("{} {} {}", b.open, b.kind.name(), b.place)
                });
                let mut cells = vec![i.time.clone(), i.pid.to_string()];
                if wide {
                    cells.push(i.tid.to_string());
                }
                cells.extend([
                    i.syscall.clone(),
                    i.errno.to_string(),
                    format!("{}/{}", i.open, format::limit(i.limit)),
                    top,
                ]);
                Row::new(cells)
            })
            .collect();
        let mut header = vec!["time", "pid"];
        let mut widths = vec![Constraint::Length(12), Constraint::Length(7)];
        if wide {
            header.push("thread");
            widths.push(Constraint::Length(7));
        }
        header.extend(["syscall", "errno", "open", "top holder"]);
        widths.extend([
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Fill(1),
        ]);
        let table = Table::new(body, widths)
            .header(Row::new(header).style(t.label))
            .block(block)
            .row_highlight_style(if self.focused { t.selected } else { t.label })
            .highlight_symbol(if self.focused { "▶" } else { " " });
        let mut state = TableState::default().with_selected(Some(app.incidents.selected));
        StatefulWidget::render(table, area, buf, &mut state);
    }
}

/// The lines describing an incident: what failed, who held the table, the failing stack.
/// `stacks` adds each holder's whole stack (the popup); otherwise one line each.
pub fn incident_lines(app: &App, i: &IncidentRow, stacks: bool) -> Vec<Line<'static>> {
    let t = &app.theme;
    let mut lines = vec![Line::from(vec![
        Span::styled(format!("{} {}", i.syscall, i.errno), t.bad),
        Span::styled(
            format!(
                " in pid {} thread {} at {} with {}/{} open",
                i.pid,
                i.tid,
                i.wall,
                i.open,
                format::limit(i.limit)
            ),
            t.label,
        ),
    ])];
    if let Some(l) = &i.listen {
        lines.push(Line::styled(
            format!(
                "listen queue of fd {} {}: {} of {} waiting (accepted by the kernel, not by the program)",
                l.fd, l.address, l.queued, l.backlog
            ),
            t.warn,
        ));
    }
    lines.push(Line::styled("the table at that instant:", t.title));
    for b in &i.blame {
        lines.push(Line::from(vec![
            Span::styled(format!("{:>6} {:<8} ", b.open, b.kind.name()), t.label),
            Span::raw(b.place.clone()),
        ]));
        if stacks {
            lines.extend(frame_lines(
                app,
                app.collector.cached_frames(b.stack),
                "         ",
            ));
        }
    }
    let frames = app.collector.cached_frames(i.stack);
    lines.push(Line::styled(
        format!(
            "the failing call: {}",
            if frames.is_empty() {
                "(no stack)".into()
            } else {
                place(frames)
            }
        ),
        t.title,
    ));
    lines.extend(frame_lines(app, frames, ""));
    lines
}

pub struct IncidentDetails<'a> {
    pub app: &'a App,
}

impl Widget for IncidentDetails<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let incident = app.selected_incident();
        let title = incident.map_or_else(
            || " details ".to_string(),
            |i| format!(" {} {} at {} ", i.syscall, i.errno, i.time),
        );
        let block = Block::bordered()
            .border_style(t.border)
            .title(Span::styled(title, t.title))
            .title_bottom(Line::styled(" ⏎ stacks ", t.dim).right_aligned());
        let lines = incident.map_or_else(
            || vec![Line::styled("no EMFILE/ENFILE so far", t.dim)],
            |i| incident_lines(app, i, false),
        );
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false })
            .render(area, buf);
    }
}
