"""Post-market surveillance of the AI models: how often their flags turn out right (PPV,
sensitivity, specificity with Wilson intervals), CUSUM charts that raise an alarm when a daily
performance figure drifts from its expected level, drift tests on the inputs (scanner
manufacturer, slice thickness, ...) corrected for multiple testing, and the agreement between the
active model and a candidate running in shadow mode. The statistics live in ``statistics``, as
pure functions over counts and values; reading the worklist and raising alerts are elsewhere."""
