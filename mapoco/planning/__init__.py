"""`mapoco plan`: where a run's actors would land and what each GPU would hold, from the models' shapes."""
