def team_saved(sender, instance, created, **kwargs):
    if created:
        from ingest.services import source_ensure_builtin

        source_ensure_builtin(team=instance)
