//! The timeline: open descriptors of the focus process over time, its limit as a line, and a
//! mark at each EMFILE/ENFILE, the first one labelled with its time to the millisecond.

use ratatui::{
    buffer::Buffer,
    layout::Rect,
    symbols::Marker,
    text::{Line, Span},
    widgets::{
        Block, Widget,
        canvas::{Canvas, Line as Segment},
    },
};

use super::{App, format};

pub struct TimelineChart<'a> {
    pub app: &'a App,
}

const MARK: &str = "×";

impl Widget for TimelineChart<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (tl, t) = (&self.app.view.timeline, &self.app.theme);
        let span_ns = tl.end_ns.saturating_sub(tl.start_ns).max(1_000_000_000);
        let title = match (tl.pid, tl.limit) {
            (Some(pid), Some(limit)) => format!(" open descriptors · pid {pid} · limit {limit} "),
            (Some(pid), None) => format!(" open descriptors · pid {pid} · no limit "),
            (None, _) => " open descriptors ".to_string(),
        };
        let block = Block::bordered()
            .border_style(t.border)
            .title(Span::styled(title, t.title))
            .title_bottom(Line::styled(
                format!(" -{} ", format::secs(span_ns as f64 / 1e9)),
                t.dim,
            ))
            .title_bottom(Line::styled(" now ", t.dim).right_aligned());
        let inner = block.inner(area);
        if tl.points.is_empty() {
            block.render(area, buf);
            Line::styled("collecting…", t.dim).render(inner, buf);
            return;
        }
        let max_open = tl.points.iter().map(|p| p.1).max().unwrap_or(0);
        // Room above the limit for the EMFILE label, however few rows there are.
        let rows = f64::from(inner.height.max(3));
        let headroom = (rows / (rows - 1.5)).max(1.15);
        let top = match tl.limit {
            Some(limit) => limit.max(max_open) as f64 * headroom,
            None => (max_open.max(1) as f64 * 1.25).max(4.0),
        };
        let span = span_ns as f64 / 1e9;
        let x = |ts: u64| ts.saturating_sub(tl.start_ns) as f64 / 1e9;
        // Canvas units per terminal cell, to place labels by their width.
        let per_col = span / f64::from(inner.width.max(1));
        let per_row = top / f64::from(inner.height.max(1));
        Canvas::default()
            .block(block)
            .marker(Marker::Braille)
            .x_bounds([0.0, span])
            .y_bounds([0.0, top])
            .paint(|ctx| {
                if let Some(limit) = tl.limit {
                    ctx.draw(&Segment::new(
                        0.0,
                        limit as f64,
                        span,
                        limit as f64,
                        t.limit.fg.unwrap_or_default(),
                    ));
                }
                let color = t.line.fg.unwrap_or_default();
                if let [(ts, open)] = tl.points[..] {
                    let (px, py) = (x(ts), open as f64);
                    ctx.draw(&Segment::new(px, py, px, py, color));
                }
                for pair in tl.points.windows(2) {
                    let ((t0, v0), (t1, v1)) = (pair[0], pair[1]);
                    ctx.draw(&Segment::new(x(t0), v0 as f64, x(t1), v1 as f64, color));
                }
                ctx.layer();
                if let Some(limit) = tl.limit {
                    // Just under the line, at the left, unless the curve is there.
                    ctx.print(
                        0.0,
                        (limit as f64 - per_row).max(0.0),
                        Span::styled(format!("limit {limit}"), t.limit),
                    );
                }
                for &(ts, open) in &tl.failures {
                    ctx.print(x(ts), (open as f64).min(top), Span::styled(MARK, t.marker));
                }
                if let (Some(&(ts, _)), Some(label)) = (tl.failures.first(), &tl.first_label) {
                    let text = format!("▼ {label}");
                    let width = text.chars().count() as f64 * per_col;
                    let at = x(ts);
                    // Keep the label on screen: right-aligned on the mark near the right edge.
                    let (lx, text) = if at + width > span {
                        ((at - width + per_col).max(0.0), format!("{label} ▼"))
                    } else {
                        (at, text)
                    };
                    ctx.print(lx, top, Span::styled(text, t.marker));
                }
            })
            .render(area, buf);
    }
}
