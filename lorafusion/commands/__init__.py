"""Sub-commands of the `lorafusion` CLI; each module defines add_arguments(parser) and run(args)."""
