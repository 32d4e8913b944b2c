from django.db.models import CharField, Lookup


def glob_to_like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


@CharField.register_lookup
class Glob(Lookup):
    """`field__glob="com.stripe.*"`: shell-style match, as listeners filter types."""

    lookup_name = "glob"

    def as_sql(self, compiler, connection):
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        return f"{lhs} LIKE {rhs} ESCAPE '\\'", [*lhs_params, *rhs_params]

    def get_db_prep_lookup(self, value, connection):
        return ("%s", [glob_to_like(value)])
