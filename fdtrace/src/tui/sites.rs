//! The call-site table and the selected site's details.

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Rect},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, StatefulWidget, Table, TableState, Widget, Wrap},
};

use super::{App, app::Pane, format, theme::Theme, view::SiteRow};
use crate::{model::Origin, report::fmt_frame};

pub struct SitesTable<'a> {
    pub app: &'a App,
    pub focused: bool,
    /// Name the other pane in the title (when only one list fits).
    pub tabs: bool,
}

/// The block of a list pane: its title, and the other pane's when they take turns.
pub fn pane_block<'a>(
    app: &App,
    pane: Pane,
    title: String,
    focused: bool,
    tabs: bool,
) -> Block<'a> {
    let t = &app.theme;
    let mut spans = vec![Span::styled(title, if focused { t.title } else { t.label })];
    if tabs {
        let other = match pane {
            Pane::Sites => format!("incidents {}", app.view.incidents_shown),
            Pane::Incidents => format!("call sites {}", app.visible_sites().len()),
        };
        spans.push(Span::styled(format!("│ tab: {other} "), t.dim));
    }
    Block::bordered()
        .border_style(if focused { t.focused_border } else { t.border })
        .title(Line::from(spans))
}

impl Widget for SitesTable<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let rows = app.visible_sites();
        let filter = if app.sites.filter.is_empty() {
            String::new()
        } else {
            format!("· kind ~ {} ", app.sites.filter)
        };
        let title = format!(
            " call sites {} · sort {} {filter}",
            rows.len(),
            app.sites.sort.name()
        );
        let block = pane_block(app, Pane::Sites, title, self.focused, self.tabs);
        let wide = area.width >= 100;
        let header = if wide {
            vec![
                "kind", "pid", "open", "growth/m", "oldest", "p50", "p99", "where",
            ]
        } else {
            vec!["kind", "open", "grow/m", "oldest", "p50", "p99", "where"]
        };
        let body: Vec<Row> = rows.iter().map(|s| site_row(s, wide, t)).collect();
        let mut widths = vec![Constraint::Length(8)];
        if wide {
            widths.push(Constraint::Length(7));
        }
        widths.extend([
            Constraint::Length(5),
            Constraint::Length(if wide { 8 } else { 6 }),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Fill(1),
        ]);
        let table = Table::new(body, widths)
            .header(Row::new(header).style(t.label))
            .block(block)
            .column_spacing(1)
            .row_highlight_style(if self.focused { t.selected } else { t.label })
            .highlight_symbol(if self.focused { "▶" } else { " " });
        let mut state =
            TableState::default().with_selected((!rows.is_empty()).then_some(app.sites.selected));
        StatefulWidget::render(table, area, buf, &mut state);
    }
}

fn site_row<'a>(s: &SiteRow, wide: bool, t: &Theme) -> Row<'a> {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), format::millis);
    let mut cells = vec![Cell::from(s.kind.name())];
    if wide {
        cells.push(Cell::from(s.pid.to_string()));
    }
    let growth_style = if s.growth_per_min > 0.5 {
        t.warn
    } else {
        t.label
    };
    cells.extend([
        Cell::from(Line::from(s.open.to_string()).right_aligned()),
        Cell::from(Line::styled(format::growth(s.growth_per_min), growth_style).right_aligned()),
        Cell::from(
            Line::from(s.oldest_age_ns.map_or_else(|| "-".into(), format::age)).right_aligned(),
        ),
        Cell::from(Line::from(opt(s.p50_ms)).right_aligned()),
        Cell::from(Line::from(opt(s.p99_ms)).right_aligned()),
        Cell::from(Span::styled(
            s.place.clone(),
            if s.origin == Origin::Traced {
                t.title
            } else {
                t.dim
            },
        )),
    ]);
    Row::new(cells)
}

/// The selected site: counts, example targets and its whole stack.
pub struct SiteDetails<'a> {
    pub app: &'a App,
}

/// The lines describing a site, for the details pane and popup.
pub fn site_lines(app: &App, s: &SiteRow) -> Vec<Line<'static>> {
    let t = &app.theme;
    let mut lines = vec![Line::from(vec![
        Span::styled(format!("{} open", s.open), t.title),
        Span::styled(
            format!(
                " · {} opened · {} closed · growth {}/min · oldest {}",
                s.opened,
                s.closed,
                format::growth(s.growth_per_min),
                s.oldest_age_ns.map_or_else(|| "-".into(), format::age)
            ),
            t.label,
        ),
    ])];
    if let (Some(p50), Some(p99)) = (s.p50_ms, s.p99_ms) {
        lines.push(Line::styled(
            format!(
                "lifetime of closed ones: p50 {} · p99 {}",
                format::millis(p50),
                format::millis(p99)
            ),
            t.label,
        ));
    }
    if !s.targets.is_empty() {
        lines.push(Line::from(vec![
            Span::styled("e.g. ", t.label),
            Span::raw(s.targets.join(", ")),
        ]));
    }
    let frames = app.collector.cached_frames(s.stack);
    match s.origin {
        Origin::Inherited => lines.push(Line::styled("open before tracing began: no stack", t.dim)),
        Origin::Reconciled => lines.push(Line::styled(
            "found in /proc, never seen created (SCM_RIGHTS, io_uring or lost events)",
            t.dim,
        )),
        Origin::Traced if frames.is_empty() => lines.push(Line::styled("(no stack)", t.dim)),
        Origin::Traced => lines.extend(frame_lines(app, frames, "")),
    }
    lines
}

/// `at f (file:line) [module]` then `by ...`, innermost first.
pub fn frame_lines(
    app: &App,
    frames: &[crate::report::FrameReport],
    indent: &str,
) -> Vec<Line<'static>> {
    let t = &app.theme;
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Line::from(vec![
                Span::styled(
                    format!("{indent}{} ", if i == 0 { "at" } else { "by" }),
                    t.dim,
                ),
                Span::raw(fmt_frame(f)),
            ])
        })
        .collect()
}

impl Widget for SiteDetails<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let site = app.selected_site();
        let title = site.map_or_else(
            || " details ".to_string(),
            |s| format!(" pid {} · {} · {} ", s.pid, s.kind.name(), s.place),
        );
        let block = Block::bordered()
            .border_style(t.border)
            .title(Span::styled(title, t.title))
            .title_bottom(Line::styled(" ⏎ full ", t.dim).right_aligned());
        let lines = site.map_or_else(
            || vec![Line::styled("no call site yet", t.dim)],
            |s| site_lines(app, s),
        );
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false })
            .render(area, buf);
    }
}
