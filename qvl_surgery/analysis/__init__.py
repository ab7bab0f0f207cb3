"""Analysis: reports and measurements over models (inspect, outliers, compare, sensitivity,
toolchain configs, plots). Imports the core and the passes; never the app."""
