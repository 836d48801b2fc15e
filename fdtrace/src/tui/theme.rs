//! Styles, with a colourless variant for NO_COLOR: emphasis then comes from bold, reverse
//! and underline only, so nothing the colours say is lost.

use ratatui::style::{Color, Modifier, Style};

#[derive(Clone, Copy, Debug)]
pub struct Theme {
    pub title: Style,
    pub label: Style,
    pub dim: Style,
    pub good: Style,
    pub warn: Style,
    pub bad: Style,
    pub selected: Style,
    pub focused_border: Style,
    pub border: Style,
    pub gauge: Style,
    pub line: Style,
    pub limit: Style,
    pub marker: Style,
}

impl Theme {
    pub fn new(no_color: bool) -> Self {
        if no_color {
            let plain = Style::default();
            return Self {
                title: plain.add_modifier(Modifier::BOLD),
                label: plain,
                dim: plain,
                good: plain,
                warn: plain.add_modifier(Modifier::BOLD),
                bad: plain.add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
                selected: plain.add_modifier(Modifier::REVERSED),
                focused_border: plain.add_modifier(Modifier::BOLD),
                border: plain,
                gauge: plain,
                line: plain,
                limit: plain,
                marker: plain.add_modifier(Modifier::BOLD),
            };
        }
        Self {
            title: Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD),
            label: Style::new().fg(Color::Gray),
            dim: Style::new().fg(Color::DarkGray),
            good: Style::new().fg(Color::Green),
            warn: Style::new().fg(Color::Yellow),
            bad: Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            selected: Style::new().add_modifier(Modifier::REVERSED),
            focused_border: Style::new().fg(Color::Cyan),
            border: Style::new().fg(Color::DarkGray),
            gauge: Style::new().fg(Color::Yellow).bg(Color::Black),
            line: Style::new().fg(Color::Cyan),
            limit: Style::new().fg(Color::Red),
            marker: Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        }
    }

    /// The style of a fill ratio: calm, then a warning, then bad near the limit.
    pub fn level(&self, ratio: f64) -> Style {
        if ratio >= 0.9 {
            self.bad
        } else if ratio >= 0.7 {
            self.warn
        } else {
            self.good
        }
    }
}
