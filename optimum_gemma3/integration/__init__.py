"""Where optimum-neuron, transformers, optimum-cli and the Hub meet this package: the
user-facing class (`modeling`), its registration with optimum-neuron (`registry`), the
export command (`cli`), Hub publishing and download (`hub`) and the table of generation
options (`generation_options`)."""
