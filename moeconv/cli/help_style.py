"""How `--help` and usage errors show a command's parameters, for every command at once.

typer 0.29 labels each parameter with its Python type (`<str>`, `<bool>`, `<list[str]>`) and writes
required arguments as `{src}` in the usage line; neither means anything to a user. Here:

- no type labels: a metavar a command chose (`FILE`, `SIZE`) is shown, nothing else;
- arguments are upper case (`Usage: moeconv sparsify [OPTIONS] SRC OUT`);
- a default given as text (`show_default="64"`) reads `[default: 64]`, as typer shows real ones;
- an option's first long name is its name; further long names are old names, still accepted
  (`typer.Option(32, "--calib-samples", "--num-samples")`) and left out of the help;
- a docstring's single line breaks are source wrapping: paragraphs reflow to the terminal.

typer builds `TyperOption`/`TyperArgument` itself and offers no hook for their class, so
`restyle(command)` re-classes them to the subclasses below (which add behaviour, no state), once,
when the root group is built.
"""
from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # typer ≥ 0.22 vendors click
    from typer import _click as _clicklib
except ImportError:  # pragma: no cover
    import click as _clicklib


class Option(TyperOption):
    """An option as users see it: its name, the metavar a command chose, its default; old names
    accepted but not shown (`aliases`)."""

    aliases: list[str] = []

    def display_type_rich(self, ctx):
        return self.metavar  # None: no label (typer would print the Python type)

    def _get_number_range_help_str(self):
        return None  # "[x>=1]" in the label column; a value out of range is still refused, by name

    def get_error_hint(self, ctx=None) -> str:
        return f"'{self.opts[0]}'"

    def _get_default_string(self, *, ctx, show_default_is_str: bool, default_value) -> str:
        if show_default_is_str:
            return str(self.show_default)  # typer would wrap it in parentheses
        return super()._get_default_string(ctx=ctx, show_default_is_str=False, default_value=default_value)

    def add_to_parser(self, parser, ctx) -> None:
        shown = self.opts
        self.opts = [*shown, *self.aliases]  # the parser accepts the old names too
        try:
            super().add_to_parser(parser, ctx)
        finally:
            self.opts = shown


class Argument(TyperArgument):
    """A positional argument as users see it: `SRC`, not `{src} <str>`."""

    @property
    def display_name_raw(self) -> str:
        return (self.metavar or self.name or "").upper()

    def display_type_rich(self, ctx):
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


def _restyle_param(param) -> None:
    if type(param) is TyperOption:
        param.__class__ = Option
        longs = [o for o in param.opts if o.startswith("--")]
        param.aliases = longs[1:]
        param.opts = [o for o in param.opts if o not in param.aliases]
    elif type(param) is TyperArgument:
        param.__class__ = Argument


def _reflow(text: str | None) -> str | None:
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


def restyle(command) -> None:
    """Apply the style above to `command`, its parameters, its help option and its subcommands."""
    for param in command.params:
        _restyle_param(param)
    if isinstance(command, (TyperCommand, TyperGroup)):
        command.help = _reflow(command.help)
        # click makes the --help option on first use and keeps it: make it now, restyled.
        help_option = command.get_help_option(_clicklib.Context(command))
        if help_option is not None:
            _restyle_param(help_option)
    for sub in getattr(command, "commands", {}).values():
        restyle(sub)
