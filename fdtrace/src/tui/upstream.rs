//! The upstream pane: a proxy's failed outbound connections (nginx's 502s on the connect
//! side), by peer and cause, shown under the incidents once there are any.

use ratatui::{
    buffer::Buffer,
    layout::Rect,
    text::{Line, Span},
    widgets::{Block, Paragraph, Widget},
};

use super::App;

pub struct UpstreamList<'a> {
    pub app: &'a App,
}

impl Widget for UpstreamList<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, t) = (self.app, &self.app.theme);
        let rows = &app.view.upstream;
        let total: u64 = rows.iter().map(|r| r.count).sum();
        let block = Block::bordered().border_style(t.border).title(Line::styled(
            format!(" upstream failures {total} "),
            t.label,
        ));
        let lines: Vec<Line> = rows
            .iter()
            .map(|r| {
                Line::from(vec![
                    Span::styled(format!("{:>6} ", r.count), t.bad),
                    Span::styled(format!("{:<13} ", r.cause), t.warn),
                    Span::raw(format!("{} ", r.peer)),
                    Span::styled(
                        format!(
                            "{}{} · {} pid {} · last {}",
                            r.errno,
                            r.lasted
                                .as_ref()
                                .map_or(String::new(), |d| format!(" after {d}")),
                            r.comm,
                            r.pid,
                            r.last
                        ),
                        t.dim,
                    ),
                ])
            })
            .collect();
        Paragraph::new(lines).block(block).render(area, buf);
    }
}
