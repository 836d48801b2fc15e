//! Full-screen popups: the help and the details of the selection.

use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Layout, Rect},
    text::{Line, Span},
    widgets::{Block, Clear, Paragraph, Widget, Wrap},
};

use super::{App, app::Pane, incidents::incident_lines, sites::site_lines};

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [v] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(ratatui::layout::Flex::Center)
        .areas(area);
    let [h] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(ratatui::layout::Flex::Center)
        .areas(v);
    h
}

pub struct HelpPopup<'a> {
    pub app: &'a App,
}

impl Widget for HelpPopup<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let t = &self.app.theme;
        let mut keys = vec![
            ("q, Ctrl-C", "quit (the report goes to -o FILE or stdout)"),
            ("p", "pause the view (collection goes on)"),
            ("s", "sort call sites: open → growth → age"),
            ("/", "filter call sites by kind (file, socket, pipe…)"),
            ("tab", "switch between call sites and incidents"),
            ("↑↓ j k, PgUp PgDn", "select; scroll in details"),
            ("enter", "whole stacks of the selection"),
            ("e", "write a JSON report to ./fdtrace-report-<time>.json"),
            ("esc", "close, clear the filter"),
            ("?", "this help"),
        ];
        if self.app.replay {
            keys.extend([
                ("space", "play / pause the recording"),
                ("← →", "seek 5 s"),
                ("+ -", "speed ×2 / ×½"),
            ]);
        }
        let mut lines: Vec<Line> = keys
            .into_iter()
            .map(|(k, what)| {
                Line::from(vec![
                    Span::styled(format!("{k:>18}  "), t.title),
                    Span::raw(what),
                ])
            })
            .collect();
        lines.push(Line::raw(""));
        lines.push(Line::styled(
            format!("  log: {}", self.app.log_path.display()),
            t.dim,
        ));
        let area = centered(area, 76, lines.len() as u16 + 2);
        Clear.render(area, buf);
        Paragraph::new(lines)
            .block(
                Block::bordered()
                    .border_style(t.focused_border)
                    .title(Span::styled(" keys ", t.title)),
            )
            .render(area, buf);
    }
}

pub struct DetailsPopup<'a> {
    pub app: &'a App,
    pub scroll: u16,
}

impl Widget for DetailsPopup<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let (title, lines) = match app.focus {
            Pane::Sites => app.selected_site().map_or_else(
                || {
                    (
                        " call site ".to_string(),
                        vec![Line::styled("nothing selected", t.dim)],
                    )
                },
                |s| {
                    (
                        format!(" pid {} · {} · {} ", s.pid, s.kind.name(), s.place),
                        site_lines(app, s),
                    )
                },
            ),
            Pane::Incidents => app.selected_incident().map_or_else(
                || {
                    (
                        " incident ".to_string(),
                        vec![Line::styled("nothing selected", t.dim)],
                    )
                },
                |i| {
                    (
                        format!(" {} {} at {} ", i.syscall, i.errno, i.wall),
                        incident_lines(app, i, true),
                    )
                },
            ),
        };
        let area = Rect {
            x: area.x + 1,
            y: area.y + 1,
            width: area.width.saturating_sub(2),
            height: area.height.saturating_sub(2),
        };
        Clear.render(area, buf);
        Paragraph::new(lines)
            .block(
                Block::bordered()
                    .border_style(t.focused_border)
                    .title(Span::styled(title, t.title))
                    .title_bottom(Line::styled(" ↑↓ scroll · esc close ", t.dim).right_aligned()),
            )
            .wrap(Wrap { trim: false })
            .scroll((self.scroll, 0))
            .render(area, buf);
    }
}
