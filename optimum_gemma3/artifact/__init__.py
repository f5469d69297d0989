"""The compiled folder: its file names and checksums (`files`), its export config
(`neuron_config`) and the checks a folder passes before anything runs it (`checks`).

Below the compiler and the runtime, which both read and write this contract."""
