from django import forms

from fleet.api.views import MAX_QUERY


class FleetFilterForm(forms.Form):
    federation = forms.BooleanField(required=False, label="Include federation",
                                    help_text="Also every peer's agents (read-only).")  # fmt: skip
    peer = forms.ChoiceField(required=False, label="Peer")
    q = forms.CharField(required=False, max_length=MAX_QUERY, label="Search", widget=forms.TextInput(
        attrs={"type": "search", "placeholder": "name, host, version, label"}))  # fmt: skip

    def __init__(self, *args, peers: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["peer"].choices = [("", "Every peer"), *((name, name) for name in peers)]


class RemoteGrantForm(forms.Form):
    token = forms.CharField(label="Grant token from this peer", max_length=200,
                            widget=forms.TextInput(attrs={"placeholder": "fg-…", "autocomplete": "off",
                                                          "class": "mono"}))  # fmt: skip
