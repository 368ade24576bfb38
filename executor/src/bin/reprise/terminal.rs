//! The [`Ui`] of the `reprise` binary: one line per note on stderr, each
//! phase announced when it starts, with a live elapsed time on a terminal
//! (an indicatif spinner kept out of the way of the commands' output) and a
//! plain line otherwise. `-q` keeps the tests' output and the verdict; `-v`
//! adds each command run in the OS.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use reprise_executor::ui::{Ui, write_stream};
use reprise_executor::vm::Stream;

/// How much Reprise says besides the tests' output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when writing to a terminal and `NO_COLOR` is unset.
    Auto,
    /// Colour even when writing to a file or a pipe.
    Always,
    /// No colour, and the tests are not told of one.
    Never,
}

impl ColorChoice {
    /// Whether to colour what goes to a stream that is (or is not) a
    /// terminal.
    pub fn colours(self, is_terminal: bool) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                is_terminal
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::env::var("TERM").map_or(true, |t| t != "dumb")
            }
        }
    }
}

/// The process's terminal, set once from the command line.
pub fn terminal() -> &'static Terminal {
    TERMINAL.get_or_init(|| Terminal::new(Verbosity::Normal, ColorChoice::Auto, false))
}

/// Sets the terminal's verbosity and colour, and whether this is a CI job
/// (no animation there, whatever the terminal); the first call wins.
pub fn init(verbosity: Verbosity, color: ColorChoice, ci: bool) -> &'static Terminal {
    TERMINAL.get_or_init(|| Terminal::new(verbosity, color, ci))
}

static TERMINAL: OnceLock<Terminal> = OnceLock::new();

pub struct Terminal {
    verbosity: Verbosity,
    color: ColorChoice,
    /// Colour on stderr (the verdict).
    colour: bool,
    /// stderr is a terminal: phases get a live line.
    live: bool,
    /// stdout is the same terminal as stderr, so its writes must also
    /// keep clear of the live line.
    stdout_live: bool,
    line: Mutex<Live>,
}

/// The live line: the phase it times, and whether it is drawn.
#[derive(Default)]
struct Live {
    phase: Option<(String, Instant)>,
    bar: Option<ProgressBar>,
    /// The commands left the cursor inside a line: the live line waits
    /// for its end rather than share the row.
    mid_line: bool,
}

impl Live {
    fn show(&mut self) {
        if let (None, Some((name, since))) = (&self.bar, &self.phase) {
            let bar = ProgressBar::new_spinner().with_elapsed(since.elapsed());
            bar.set_style(
                ProgressStyle::with_template("{spinner} reprise: {msg} [{elapsed}]")
                    .expect("template"),
            );
            bar.set_message(name.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        }
    }

    fn hide(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Writes with the live line lifted; it comes back unless the write
    /// ends inside a line.
    fn write(&mut self, write: impl FnOnce()) {
        match self.bar.clone() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

impl Terminal {
    fn new(verbosity: Verbosity, color: ColorChoice, ci: bool) -> Terminal {
        let err_tty = std::io::stderr().is_terminal() && !ci;
        Terminal {
            verbosity,
            color,
            colour: color.colours(err_tty),
            live: err_tty && verbosity > Verbosity::Quiet,
            stdout_live: err_tty && std::io::stdout().is_terminal(),
            line: Mutex::new(Live::default()),
        }
    }

    /// `--color`, for what else is coloured (the tests' terminal hints).
    pub fn color(&self) -> ColorChoice {
        self.color
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a line to stderr, out of the live line's way.
    fn say(&self, line: &str) {
        let mut live = self.lock();
        live.write(|| eprintln!("{line}"));
        if live.mid_line {
            live.mid_line = false;
            live.show();
        }
    }

    /// Ends the live line (before an error is printed, or at exit).
    pub fn clear(&self) {
        let mut live = self.lock();
        live.hide();
        live.phase = None;
    }

    fn paint(&self, text: &str, colour: &str) -> String {
        if self.colour {
            format!("\x1b[{colour}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

impl Ui for Terminal {
    fn note(&self, line: &str) {
        if self.verbosity > Verbosity::Quiet {
            self.say(&format!("reprise: {line}"));
        }
    }

    fn begin(&self, name: &str) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        if !self.live {
            eprintln!("reprise: {name}...");
            return;
        }
        let mut live = self.lock();
        live.hide();
        live.phase = Some((name.to_string(), Instant::now()));
        if !live.mid_line {
            live.show();
        }
    }

    fn phase(&self, name: &str, took: Duration) {
        self.clear();
        if self.verbosity > Verbosity::Quiet {
            self.say(&format!(
                "reprise: {name} done in {:.1}s",
                took.as_secs_f64()
            ));
        }
    }

    fn image_step(&self, step: &str) {
        self.note(&format!("image: {step}"));
    }

    fn command(&self, argv: &[String]) {
        if self.verbosity >= Verbosity::Verbose {
            self.say(&format!("reprise: $ {}", shell_words(argv)));
        }
    }

    fn verdict(&self, line: &str) {
        self.clear();
        let line = if let Some(rest) = line.strip_prefix("passed") {
            format!("{}{rest}", self.paint("passed", "1;32"))
        } else if let Some(rest) = line.strip_prefix("tests failed") {
            format!("{}{rest}", self.paint("tests failed", "1;31"))
        } else if let Some(rest) = line.strip_prefix("replayed") {
            format!("{}{rest}", self.paint("replayed", "1;32"))
        } else {
            line.to_string()
        };
        eprintln!("reprise: {line}");
    }

    fn output(&self, stream: Stream, bytes: &[u8]) {
        let shared = match stream {
            Stream::Stdout => self.stdout_live,
            Stream::Stderr => self.live,
        };
        if !shared || bytes.is_empty() {
            write_stream(stream, bytes);
            return;
        }
        let mut live = self.lock();
        let ends_line = bytes.ends_with(b"\n");
        if !ends_line {
            live.hide();
        }
        live.write(|| write_stream(stream, bytes));
        live.mid_line = !ends_line;
        if ends_line {
            live.show();
        }
    }
}

/// `argv` as a shell would read it back (for `-v`).
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
