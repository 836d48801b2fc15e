//! The application state, the actions that change it, and the layout that draws it.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::{
    buffer::Buffer,
    layout::{Constraint, Layout, Rect},
    text::{Line, Span},
    widgets::{Paragraph, Widget},
};

use super::{
    Control, Feed,
    header::Header,
    incidents::{IncidentDetails, IncidentsTable},
    popups::{DetailsPopup, HelpPopup},
    sites::{SiteDetails, SitesTable},
    theme::Theme,
    timeline::TimelineChart,
    upstream::UpstreamList,
    view::{Collector, IncidentRow, SiteRow, View},
};

/// Every change the user can ask for. Only [`App::update`] applies them; `Export` and
/// `Replay` need I/O and are carried out by the run loop.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Quit,
    TogglePause,
    CycleSort,
    OpenFilter,
    FilterChar(char),
    FilterBackspace,
    FilterApply,
    FilterCancel,
    NextPane,
    /// Move the selection (or scroll the details) by this many rows.
    Move(isize),
    Home,
    End,
    ToggleDetails,
    ToggleHelp,
    ClosePopup,
    Export,
    Replay(Control),
    Status(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pane {
    #[default]
    Sites,
    Incidents,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Most open descriptors first.
    #[default]
    Open,
    /// Fastest growing first.
    Growth,
    /// Oldest open descriptor first.
    Age,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Open => "open",
            SortKey::Growth => "growth",
            SortKey::Age => "age",
        }
    }

    fn next(self) -> Self {
        match self {
            SortKey::Open => SortKey::Growth,
            SortKey::Growth => SortKey::Age,
            SortKey::Age => SortKey::Open,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SitesState {
    pub selected: usize,
    pub sort: SortKey,
    /// Shows only kinds whose name contains this (case-insensitive); empty shows all.
    pub filter: String,
}

#[derive(Clone, Debug, Default)]
pub struct IncidentsState {
    pub selected: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Popup {
    Help,
    Details { scroll: u16 },
}

pub struct App {
    pub view: View,
    pub collector: Collector,
    pub focus: Pane,
    pub sites: SitesState,
    pub incidents: IncidentsState,
    pub popup: Option<Popup>,
    /// The filter being typed, while the prompt is open.
    pub filter_input: Option<String>,
    pub paused: bool,
    pub status: Option<String>,
    pub quit: bool,
    pub replay: bool,
    pub theme: Theme,
    /// Named in the help.
    pub log_path: std::path::PathBuf,
    /// `--warn-at PERCENT`: the header warns when the process holds this share of its limit.
    pub warn_at: Option<f64>,
}

impl App {
    pub fn new(replay: bool, no_color: bool) -> Self {
        Self {
            view: View::default(),
            collector: Collector::default(),
            focus: Pane::Sites,
            sites: SitesState::default(),
            incidents: IncidentsState::default(),
            popup: None,
            filter_input: None,
            paused: false,
            status: None,
            quit: false,
            replay,
            theme: Theme::new(no_color),
            log_path: super::log_path(),
            warn_at: None,
        }
    }

    /// Samples the feed after a pump (always, paused or not).
    pub fn observe(&mut self, feed: &dyn Feed) {
        self.collector.observe(feed);
    }

    /// Derives the view from the model, unless paused.
    pub fn refresh(&mut self, feed: &dyn Feed) {
        if !self.paused {
            self.view = self.collector.view(feed);
            self.clamp();
        }
    }

    pub fn handle_key(&self, key: KeyEvent) -> Option<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if self.filter_input.is_some() {
            return match key.code {
                KeyCode::Enter => Some(Action::FilterApply),
                KeyCode::Esc => Some(Action::FilterCancel),
                KeyCode::Backspace => Some(Action::FilterBackspace),
                KeyCode::Char(c) => Some(Action::FilterChar(c)),
                _ => None,
            };
        }
        let in_popup = self.popup.is_some();
        let action = match key.code {
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Esc if in_popup => Action::ClosePopup,
            KeyCode::Esc if !self.sites.filter.is_empty() => Action::FilterCancel,
            KeyCode::Char('?') => Action::ToggleHelp,
            KeyCode::Enter => Action::ToggleDetails,
            KeyCode::Up | KeyCode::Char('k') => Action::Move(-1),
            KeyCode::Down | KeyCode::Char('j') => Action::Move(1),
            KeyCode::PageUp => Action::Move(-10),
            KeyCode::PageDown => Action::Move(10),
            KeyCode::Home | KeyCode::Char('g') => Action::Home,
            KeyCode::End | KeyCode::Char('G') => Action::End,
            _ if in_popup => return None,
            KeyCode::Char('p') => Action::TogglePause,
            KeyCode::Char('s') => Action::CycleSort,
            KeyCode::Char('/') => Action::OpenFilter,
            KeyCode::Tab | KeyCode::BackTab => Action::NextPane,
            KeyCode::Char('e') => Action::Export,
            KeyCode::Char(' ') if self.replay => Action::Replay(Control::TogglePlay),
            KeyCode::Left if self.replay => Action::Replay(Control::Seek(-5.0)),
            KeyCode::Right if self.replay => Action::Replay(Control::Seek(5.0)),
            KeyCode::Char('+' | '=') if self.replay => Action::Replay(Control::Speed(2.0)),
            KeyCode::Char('-') if self.replay => Action::Replay(Control::Speed(0.5)),
            _ => return None,
        };
        Some(action)
    }

    pub fn update(&mut self, action: Action) {
        match action {
            Action::Quit => self.quit = true,
            Action::TogglePause => {
                self.paused = !self.paused;
                self.status = Some(if self.paused {
                    "paused: still collecting, view frozen (p resumes)".into()
                } else {
                    "resumed".into()
                });
            }
            Action::CycleSort => {
                self.sites.sort = self.sites.sort.next();
                self.sites.selected = 0;
                self.status = Some(format!("sorted by {}", self.sites.sort.name()));
            }
            Action::OpenFilter => {
                self.filter_input = Some(self.sites.filter.clone());
            }
            Action::FilterChar(c) => {
                if let Some(input) = &mut self.filter_input {
                    input.push(c);
                }
            }
            Action::FilterBackspace => {
                if let Some(input) = &mut self.filter_input {
                    input.pop();
                }
            }
            Action::FilterApply => {
                if let Some(input) = self.filter_input.take() {
                    self.sites.filter = input.trim().to_lowercase();
                    self.sites.selected = 0;
                    self.focus = Pane::Sites;
                }
            }
            Action::FilterCancel => {
                if self.filter_input.take().is_none() {
                    self.sites.filter.clear();
                }
            }
            Action::NextPane => {
                self.focus = match self.focus {
                    Pane::Sites => Pane::Incidents,
                    Pane::Incidents => Pane::Sites,
                };
            }
            Action::Move(delta) => self.move_by(delta),
            Action::Home => self.move_by(isize::MIN / 2),
            Action::End => self.move_by(isize::MAX / 2),
            Action::ToggleDetails => {
                self.popup = match self.popup {
                    Some(Popup::Details { .. }) => None,
                    _ => Some(Popup::Details { scroll: 0 }),
                };
            }
            Action::ToggleHelp => {
                self.popup = match self.popup {
                    Some(Popup::Help) => None,
                    _ => Some(Popup::Help),
                };
            }
            Action::ClosePopup => self.popup = None,
            Action::Status(text) => self.status = Some(text),
            // Carried out by the run loop.
            Action::Export | Action::Replay(_) => {}
        }
        self.clamp();
    }

    fn move_by(&mut self, delta: isize) {
        if let Some(Popup::Details { scroll }) = &mut self.popup {
            *scroll = scroll.saturating_add_signed(delta.clamp(-1000, 1000) as i16);
            return;
        }
        let selected = match self.focus {
            Pane::Sites => &mut self.sites.selected,
            Pane::Incidents => &mut self.incidents.selected,
        };
        *selected = selected.saturating_add_signed(delta);
    }

    /// Keeps selections inside their lists.
    fn clamp(&mut self) {
        let sites = self.visible_sites().len();
        self.sites.selected = self.sites.selected.min(sites.saturating_sub(1));
        let incidents = self.view.incidents_shown;
        self.incidents.selected = self.incidents.selected.min(incidents.saturating_sub(1));
    }

    /// The call sites after the filter, in the chosen order.
    pub fn visible_sites(&self) -> Vec<&SiteRow> {
        let filter = &self.sites.filter;
        let mut rows: Vec<&SiteRow> = self
            .view
            .sites
            .iter()
            .filter(|s| filter.is_empty() || s.kind.name().contains(filter.as_str()))
            .collect();
        let by_open = |a: &&SiteRow, b: &&SiteRow| {
            b.open
                .cmp(&a.open)
                .then(
                    a.origin
                        .eq(&crate::model::Origin::Inherited)
                        .cmp(&b.origin.eq(&crate::model::Origin::Inherited)),
                )
                .then(a.id.cmp(&b.id))
        };
        match self.sites.sort {
            SortKey::Open => rows.sort_by(by_open),
            SortKey::Growth => rows.sort_by(|a, b| {
                b.growth_per_min
                    .total_cmp(&a.growth_per_min)
                    .then_with(|| by_open(a, b))
            }),
            SortKey::Age => rows.sort_by(|a, b| {
                b.oldest_age_ns
                    .cmp(&a.oldest_age_ns)
                    .then_with(|| by_open(a, b))
            }),
        }
        rows
    }

    pub fn selected_site(&self) -> Option<&SiteRow> {
        self.visible_sites().get(self.sites.selected).copied()
    }

    /// The incidents in view, newest last.
    pub fn shown_incidents(&self) -> &[IncidentRow] {
        let n = self
            .view
            .incidents_shown
            .min(self.collector.incidents.len());
        &self.collector.incidents[..n]
    }

    pub fn selected_incident(&self) -> Option<&IncidentRow> {
        self.shown_incidents().get(self.incidents.selected)
    }

    fn render_sites(&self, area: Rect, buf: &mut Buffer, focused: bool, tabs: bool) {
        SitesTable {
            app: self,
            focused,
            tabs,
        }
        .render(area, buf);
    }

    fn render_incidents(&self, area: Rect, buf: &mut Buffer, focused: bool, tabs: bool) {
        IncidentsTable {
            app: self,
            focused,
            tabs,
        }
        .render(area, buf);
    }

    fn render_details(&self, area: Rect, buf: &mut Buffer) {
        match self.focus {
            Pane::Sites => SiteDetails { app: self }.render(area, buf),
            Pane::Incidents => IncidentDetails { app: self }.render(area, buf),
        }
    }

    fn render_body(&self, area: Rect, buf: &mut Buffer) {
        let wide = area.width >= 120;
        let tall = area.height >= 22;
        let (lists, details) = if wide {
            let [l, d] =
                Layout::horizontal([Constraint::Percentage(58), Constraint::Fill(1)]).areas(area);
            (l, d)
        } else {
            let [l, d] =
                Layout::vertical([Constraint::Percentage(55), Constraint::Fill(1)]).areas(area);
            (l, d)
        };
        if tall && !self.view.upstream.is_empty() {
            // A proxy's failed connects: as much the story as its own table, when it has any.
            let shown = self.view.upstream.len().min(6) as u16;
            let [s, i, u] = Layout::vertical([
                Constraint::Percentage(45),
                Constraint::Fill(1),
                Constraint::Length(shown + 2),
            ])
            .areas(lists);
            self.render_sites(s, buf, self.focus == Pane::Sites, false);
            self.render_incidents(i, buf, self.focus == Pane::Incidents, false);
            UpstreamList { app: self }.render(u, buf);
        } else if tall {
            let [s, i] =
                Layout::vertical([Constraint::Percentage(60), Constraint::Fill(1)]).areas(lists);
            self.render_sites(s, buf, self.focus == Pane::Sites, false);
            self.render_incidents(i, buf, self.focus == Pane::Incidents, false);
        } else {
            match self.focus {
                Pane::Sites => self.render_sites(lists, buf, true, true),
                Pane::Incidents => self.render_incidents(lists, buf, true, true),
            }
        }
        self.render_details(details, buf);
    }

    fn render_status(&self, area: Rect, buf: &mut Buffer) {
        let t = &self.theme;
        let line = if let Some(input) = &self.filter_input {
            Line::from(vec![
                Span::styled("filter by kind: ", t.title),
                Span::raw(input.clone()),
                Span::styled("▏", t.title),
                Span::styled("  enter apply · esc cancel", t.dim),
            ])
        } else if let Some(status) = &self.status {
            Line::from(vec![
                Span::styled(status.clone(), t.warn),
                Span::styled("  ? help", t.dim),
            ])
        } else {
            let mut keys = vec![
                ("q", "quit"),
                ("p", if self.paused { "resume" } else { "pause" }),
                ("s", "sort"),
                ("/", "filter"),
                ("tab", "pane"),
                ("⏎", "details"),
                ("e", "report"),
                ("?", "help"),
            ];
            if self.replay {
                keys.extend([("␣", "play"), ("←→", "seek"), ("+-", "speed")]);
            }
            let mut spans = Vec::new();
            for (key, what) in keys {
                spans.push(Span::styled(key, t.title));
                spans.push(Span::styled(format!(" {what}  "), t.label));
            }
            Line::from(spans)
        };
        Paragraph::new(line).render(area, buf);
    }
}

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let chart_height = match area.height {
            40.. => 14,
            30..40 => 10,
            _ => 7,
        };
        let [header, chart, body, status] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Length(chart_height),
            Constraint::Fill(1),
            Constraint::Length(1),
        ])
        .areas(area);
        Header { app: self }.render(header, buf);
        TimelineChart { app: self }.render(chart, buf);
        self.render_body(body, buf);
        self.render_status(status, buf);
        match &self.popup {
            Some(Popup::Help) => HelpPopup { app: self }.render(area, buf),
            Some(Popup::Details { scroll }) => DetailsPopup {
                app: self,
                scroll: *scroll,
            }
            .render(area, buf),
            None => {}
        }
    }
}
