//! `backupfs man`: one roff manual page for the whole command, generated from clap's
//! definition of the command line so that it cannot drift from `--help`. It only renders
//! text; the command line itself is defined in main.rs.

/// One manual page for the whole command: the top-level sections, then one section per
/// subcommand with its synopsis, description, options and examples (clap_mangen's own
/// page would refer to a page per subcommand, which nobody installs).
pub fn render(mut cli: clap::Command) -> std::io::Result<String> {
    // clap_mangen starts every section with this string definition; once is enough.
    const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    let render = |f: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut roff = Vec::new();
        f(&mut roff).map(|()| String::from_utf8_lossy(&roff).replace(PREAMBLE, ""))
    };
    cli.build();
    let top = clap_mangen::Man::new(cli.clone());
    let mut page = PREAMBLE.to_string();
    page += &render(&|w| top.render_title(w))?;
    page += &render(&|w| top.render_name_section(w))?;
    page += &render(&|w| top.render_synopsis_section(w))?;
    page += &render(&|w| top.render_description_section(w))?;
    page += &render(&|w| top.render_options_section(w))?;
    for sub in cli
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
    {
        page += &format!(
            ".SH \"COMMAND: BACKUPFS {}\"\n",
            sub.get_name().to_uppercase()
        );
        let man = clap_mangen::Man::new(sub.clone());
        // The command's sections become subsections of its section.
        let demote = |roff: String| roff.replace(".SH ", ".SS ");
        page += &demote(render(&|w| man.render_synopsis_section(w))?);
        page += &demote(render(&|w| man.render_description_section(w))?);
        if sub.get_arguments().any(|arg| !arg.is_hide_set()) {
            page += &demote(render(&|w| man.render_options_section(w))?);
        }
        if let Some(examples) = sub.get_after_help() {
            // Command lines, one per line: no filling, no "Examples:" label.
            page += ".SS EXAMPLES\n.nf\n";
            for line in examples.to_string().lines().skip(1) {
                page += &roff_escape(line.trim_start());
                page += "\n";
            }
            page += ".fi\n";
        }
    }
    page += &render(&|w| top.render_extra_section(w))?.replace(".SH EXTRA", ".SH NOTES");
    page += &render(&|w| top.render_version_section(w))?;
    Ok(page)
}

/// Text for a roff line: backslashes and leading control characters made literal.
fn roff_escape(line: &str) -> String {
    let line = line.replace('\\', "\\e").replace('-', "\\-");
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line
    }
}
